"""What a candidate program of each task shape reads and returns: the language's per-task specs.

A spec names the inputs (canonical name -> shape), their aliases, and the shape the result must
have. Task plug-ins (autoprune_ray.tasks) pick the spec their candidates are written in."""
from __future__ import annotations

from dataclasses import dataclass, field

from autoprune_ray.tree.expr import COLVEC, MATRIX, SCALAR, Shape


@dataclass(frozen=True)
class LanguageSpec:
    """What a candidate computes: its inputs (canonical name -> shape), their aliases, and the
    shape its result must have."""
    name: str
    inputs: dict[str, Shape]
    aliases: dict[str, str]
    result_must_vary: str          # "matrix": a per-weight score; "rows": one value per layer
    describe: dict[str, str] = field(default_factory=dict)
    function: str = "score"        # the name a printed program's function gets
    example: str = "def score(W, A): return ..."   # what a completion without a function is told to write

    def canonical_input(self, name: str) -> str | None:
        if name in self.inputs:
            return name
        return self.aliases.get(name) or self.aliases.get(name.lower())


PRUNE = LanguageSpec(
    name="prune",
    inputs={"W": MATRIX, "G": MATRIX, "A": COLVEC, "M": COLVEC, "V": COLVEC, "H": COLVEC, "d": SCALAR},
    aliases={"weight": "W", "weights": "W", "w": "W", "grad": "G", "g": "G", "grad_rms": "G", "gradient": "G",
             "act": "A", "a": "A", "norm": "A", "x_norm": "A", "act_norm": "A", "activation": "A", "x": "A",
             "mean": "M", "mu": "M", "m": "M", "x_mean": "M", "var": "V", "variance": "V", "v": "V", "x_var": "V",
             "hdiag": "H", "h_diag": "H", "gram_diag": "H", "h": "H", "depth": "d", "layer_frac": "d",
             "depth_frac": "d"},
    result_must_vary="matrix",
    describe={"W": "weight [out, in]", "G": "gradient RMS [out, in]", "A": "input-channel L2 norm [in]",
              "M": "input-channel mean [in]", "V": "input-channel variance [in]", "H": "Gram diagonal [in]",
              "d": "layer depth fraction in [0, 1] (scalar)"},
)

# Layer-wise allocation (SDSA): one row per prunable linear layer (block-major, the block's linears
# in model order: q, k, v, o, gate, up, down for LLaMA), each input laid out as [N, 1].
_LAYERS = Shape(True, False)
_ROLES = {"q": ("query", "q_proj", "attn_q", "is_query"), "k": ("key", "k_proj", "attn_k", "is_key"),
          "v": ("value", "v_proj", "attn_v", "is_value"),
          "o": ("o_proj", "out_proj", "attn_o", "attn_out", "is_out", "is_output"),
          "gate": ("gate", "gate_proj", "mlp_gate"), "up": ("up", "up_proj", "mlp_up"),
          "down": ("down", "down_proj", "mlp_down")}
_ROLE_WORDS = {"q": "attention query", "k": "attention key", "v": "attention value", "o": "attention output",
               "gate": "MLP gate", "up": "MLP up", "down": "MLP down"}
ALLOCATE = LanguageSpec(
    name="allocate",
    inputs={"skew": _LAYERS, "kurt": _LAYERS, "outlier": _LAYERS, "alpha": _LAYERS, "depth": _LAYERS,
            "size": _LAYERS, "sens": _LAYERS, **{f"is_{role}": _LAYERS for role in _ROLES}},
    aliases={"skewness": "skew", "kurtosis": "kurt", "outlier_ratio": "outlier", "outliers": "outlier",
             "pl_alpha": "alpha", "alpha_hill": "alpha", "pl_alpha_hill": "alpha", "hill_alpha": "alpha",
             "esd_alpha": "alpha", "tail_alpha": "alpha", "d": "depth", "depth_frac": "depth",
             "numel": "size", "n_params": "size", "params": "size", "param_share": "size",
             "sensitivity": "sens", "recon_error": "sens", "reconstruction_error": "sens", "wanda_error": "sens",
             **{alias: f"is_{role}" for role, names in _ROLES.items() for alias in names}},
    result_must_vary="rows",
    describe={"skew": "skewness of the layer's Wanda scores |W|·||X||", "kurt": "excess kurtosis of those scores",
              "outlier": "share of those scores above 5× their mean (OWL's D)",
              "alpha": "heavy-tail exponent of the weight spectrum (AlphaPruning; lower = better trained)",
              "depth": "depth fraction of the layer's block in [0, 1]", "size": "layer's share of all parameters",
              "sens": "relative output error ||ΔW X||²/||W X||² of Wanda-pruning this layer alone at the target",
              **{f"is_{role}": f"1 if {words}, else 0" for role, words in _ROLE_WORDS.items()}},
    function="allocate",
    example="def allocate(outlier): return ...",
)
# Mixed-precision sensitivity (TAP): evaluated once per (layer, bit width) on that layer's tensors,
# with E = Q_b(W) − W the layer's quantization error at the bit width being scored; reduces to one
# number. The allocator gives fewer bits where the sum of sensitivities grows least.
MPQ = LanguageSpec(
    name="mpq",
    inputs={"E": MATRIX, "W": MATRIX, "G": MATRIX, "A": COLVEC, "H": COLVEC, "b": SCALAR, "d": SCALAR},
    aliases={"err": "E", "error": "E", "q_err": "E", "qerr": "E", "delta": "E", "dw": "E", "e": "E",
             "weight": "W", "weights": "W", "w": "W", "grad": "G", "g": "G", "grad_rms": "G", "gradient": "G",
             "act": "A", "a": "A", "norm": "A", "x_norm": "A", "act_norm": "A", "activation": "A", "x": "A",
             "hdiag": "H", "h_diag": "H", "gram_diag": "H", "h": "H", "bits": "b", "nbits": "b",
             "depth": "d", "layer_frac": "d", "depth_frac": "d"},
    result_must_vary="scalar",
    describe={"E": "quantization error Q(W) - W at the bit width being scored [out, in]",
              "W": "weight [out, in]", "G": "gradient RMS [out, in]", "A": "input-channel L2 norm [in]",
              "H": "Gram diagonal (sum over tokens of x_j^2) [in]", "b": "the bit width being scored (scalar)",
              "d": "layer depth fraction in [0, 1] (scalar)"},
    function="sensitivity",
    example="def sensitivity(E, H): return ...",
)
SPECS = {"prune": PRUNE, "allocate": ALLOCATE, "mpq": MPQ}
