"""Calibration statistics of every prunable linear layer, collected block by block.

The block-by-block walk is written once here (Wanda copies it into every method):
`BlockWalker` catches the inputs of the first decoder block, then feeds them through one
block at a time. Two modes:

* one-pass   dense statistics, each block fed the dense outputs of the block before it;
* sequential the Wanda protocol: a `BlockHook` may prune each block after its statistics
             are taken, and the block is re-run so the next block sees pruned inputs.

Per input of a linear layer (q/k/v share one input, as do gate/up) we keep, over all
calibration tokens: the sum and sum of squares per channel (mean, variance, L2 norm) and,
optionally, the Gram matrix XᵀX. Gradient RMS per weight comes from the LM loss
(`lm_loss_grad_rms`); LLM-Barber's block-reconstruction gradients live in barber.py.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import TokenData
from .models import LoadedModel, block_linears, cache_root, decoder_layers


TENSOR_FIELDS = ("sum", "sq_sum", "gram")


@dataclass
class InputStats:
    """Running statistics of the input X [tokens, in] of one or more linear layers."""
    tokens: int = 0
    samples: int = 0
    sum: torch.Tensor | None = None        # [in] float64
    sq_sum: torch.Tensor | None = None     # [in] float64
    gram: torch.Tensor | None = None       # [in, in] float32, Σ_t x_t x_tᵀ

    def update(self, x: torch.Tensor, samples: int, with_gram: bool) -> None:
        x = x.reshape(-1, x.shape[-1]).detach()
        x64 = x.double()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            self.sq_sum = torch.zeros_like(self.sum)
        self.sum += x64.sum(0)
        self.sq_sum += (x64 * x64).sum(0)
        if with_gram:
            xf = x.float()
            self.gram = xf.T @ xf if self.gram is None else self.gram.addmm_(xf.T, xf)
        self.tokens += x.shape[0]
        self.samples += samples

    # Derived views -------------------------------------------------------
    @property
    def norm(self) -> torch.Tensor:
        """||X_j||₂ over all calibration tokens."""
        return self.sq_sum.sqrt().float()

    @property
    def wanda_norm(self) -> torch.Tensor:
        """sqrt of Wanda's `scaler_row` (mean over samples of Σ_tokens x_j²): ||X_j||₂ / sqrt(samples)."""
        return (self.sq_sum / self.samples).sqrt().float()

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / self.tokens).float()

    @property
    def var(self) -> torch.Tensor:
        m = self.sum / self.tokens
        return (self.sq_sum / self.tokens - m * m).clamp_min(0).float()

    @property
    def gram_diag(self) -> torch.Tensor:
        return self.gram.diagonal().clone() if self.gram is not None else self.sq_sum.float()

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "samples": self.samples, "sum": self.sum, "sq_sum": self.sq_sum,
                "gram": self.gram}


@dataclass
class BlockStats:
    """Statistics of one decoder block: linear name -> its (possibly shared) input statistics."""
    inputs: dict[str, InputStats] = field(default_factory=dict)
    grad_rms: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, linear: str) -> InputStats:
        return self.inputs[linear]


@dataclass
class CalibrationStats:
    blocks: list[BlockStats]
    key: dict

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".partial")
        torch.save(self._payload(lambda t: t), tmp)
        tmp.replace(path)  # atomic

    @classmethod
    def load(cls, path: Path) -> "CalibrationStats":
        return cls._from_payload(torch.load(path, weights_only=True), lambda t: t)

    def to_shared(self) -> dict:
        """The statistics as numpy arrays, for Ray's object store: the evaluators of one node then
        read one copy in shared memory (numpy arrays come back from the store without a copy)."""
        return self._payload(lambda t: None if t is None else t.cpu().numpy())

    @classmethod
    def from_shared(cls, payload: dict, device: str | torch.device = "cpu") -> "CalibrationStats":
        """Tensors over `to_shared`'s arrays, without a copy on the CPU (an accelerator gets its own
        copy). The store's arrays are read-only, and so are these statistics everywhere they are
        read: a walk only ever writes fresh ones."""
        def tensor(a):
            return None if a is None else torch.from_numpy(a).to(device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return cls._from_payload(payload, tensor)

    def _payload(self, convert) -> dict:
        """Blocks as plain dicts; linears that share one input (q/k/v, gate/up) keep one group."""
        payload = {"key": self.key, "blocks": []}
        for block in self.blocks:
            groups, members = {}, {}
            for name, st in block.inputs.items():
                gid = next((g for g, obj in groups.items() if obj is st), name)
                groups.setdefault(gid, st)
                members[name] = gid
            payload["blocks"].append({
                "groups": {g: {k: convert(v) if k in TENSOR_FIELDS else v for k, v in st.to_dict().items()}
                           for g, st in groups.items()},
                "members": members, "grad_rms": {n: convert(t) for n, t in block.grad_rms.items()}})
        return payload

    @classmethod
    def _from_payload(cls, payload: dict, convert) -> "CalibrationStats":
        blocks = []
        for b in payload["blocks"]:
            groups = {g: InputStats(**{k: convert(v) if k in TENSOR_FIELDS else v for k, v in d.items()})
                      for g, d in b["groups"].items()}
            grads = {n: convert(t) for n, t in b["grad_rms"].items()}
            blocks.append(BlockStats({n: groups[g] for n, g in b["members"].items()}, grads))
        return cls(blocks, payload["key"])


class BlockHook(Protocol):
    """Called by the sequential walk after block `index`'s statistics are taken."""
    signature: str

    def __call__(self, index: int, block: nn.Module, stats: BlockStats, ctx: "BlockContext") -> None: ...


@dataclass
class BlockContext:
    """What a block hook may need besides statistics: the block's inputs, the extra arguments
    every block call takes (rotary embeddings, masks) and the block's dense outputs."""
    inputs: torch.Tensor
    kwargs: dict
    dense_outputs: torch.Tensor
    walker: "BlockWalker"


class _Caught(Exception):
    pass


class BlockWalker:
    """Feed calibration windows through a decoder one block at a time."""

    def __init__(self, lm: LoadedModel, windows: torch.Tensor, batch_size: int = 8):
        self.lm = lm
        self.layers = decoder_layers(lm.model)
        self.batch_size = batch_size
        self.inputs, self.kwargs = self._catch_first_block_inputs(windows.to(lm.device))

    def _catch_first_block_inputs(self, windows: torch.Tensor):
        captured, kwargs = [], {}

        def grab(_module, args, kw):
            captured.append(args[0] if args else kw["hidden_states"])
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
            raise _Caught

        handle = self.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for batch in windows.split(self.batch_size):
                try:
                    with torch.no_grad():
                        self.lm.model(batch, use_cache=False)
                except _Caught:
                    pass
        finally:
            handle.remove()
        # A cache object reused across samples would let later samples attend to earlier ones.
        for k in ("past_key_values", "past_key_value", "use_cache", "cache_position"):
            kwargs.pop(k, None)
        return torch.cat(captured), kwargs

    def run_block(self, block: nn.Module, inputs: torch.Tensor, grad: bool = False) -> torch.Tensor:
        outs = []
        with torch.set_grad_enabled(grad):
            for batch in inputs.split(self.batch_size):
                out = block(batch, **self.kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs)

    def block_batches(self, inputs: torch.Tensor):
        return inputs.split(self.batch_size)


def _stats_hooks(block: nn.Module, with_gram: bool):
    """Forward hooks that accumulate InputStats; linears fed the same tensor share one object."""
    stats: dict[str, InputStats] = {}
    seen: dict[int, tuple[torch.Tensor, InputStats]] = {}

    def make(name):
        def hook(_module, args, _out):
            x = args[0]
            shared = seen.get(id(x))
            if shared is not None and shared[0] is x:
                if name not in stats:
                    stats[name] = shared[1]
                return
            st = stats.setdefault(name, InputStats())
            st.update(x, samples=x.shape[0] if x.dim() == 3 else 1, with_gram=with_gram)
            seen[id(x)] = (x, st)
        return hook

    handles = [mod.register_forward_hook(make(name)) for name, mod in block_linears(block).items()]
    return stats, handles, seen


def collect_block_stats(walker: BlockWalker, block: nn.Module, inputs: torch.Tensor,
                        with_gram: bool) -> tuple[BlockStats, torch.Tensor]:
    """One pass of `inputs` through `block` with statistics hooks; returns stats and outputs."""
    stats, handles, seen = _stats_hooks(block, with_gram)
    try:
        outs = []
        with torch.no_grad():
            for batch in walker.block_batches(inputs):
                out = block(batch, **walker.kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
                seen.clear()
    finally:
        for h in handles:
            h.remove()
    return BlockStats(inputs=stats), torch.cat(outs)


def walk(lm: LoadedModel, windows: torch.Tensor, with_gram: bool = True, hook: BlockHook | None = None,
         batch_size: int = 8, progress: str | None = "calibration") -> list[BlockStats]:
    """Collect statistics for every block; with `hook`, prune sequentially (Wanda protocol)."""
    walker = BlockWalker(lm, windows, batch_size)
    inputs, all_stats = walker.inputs, []
    # disable=None: a bar only on a terminal; an actor's stderr is a log file forwarded to the driver
    bar = tqdm(walker.layers, desc=progress, disable=True if progress is None else None, leave=False)
    for index, block in enumerate(bar):
        stats, outputs = collect_block_stats(walker, block, inputs, with_gram)
        if hook is not None:
            hook(index, block, stats, BlockContext(inputs, walker.kwargs, outputs, walker))
            outputs = walker.run_block(block, inputs)  # the next block sees the pruned block's outputs
        all_stats.append(stats)
        inputs = outputs
    return all_stats


def lm_loss_grad_rms(lm: LoadedModel, windows: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """sqrt(E[g²]) of the causal-LM loss gradient for every prunable weight, one window at a time."""
    layers = decoder_layers(lm.model)
    linears = [block_linears(b) for b in layers]
    sq = [{n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in lin.items()} for lin in linears]
    params = [m.weight for lin in linears for m in lin.values()]
    for p in params:
        p.requires_grad_(True)
    try:
        for window in tqdm(windows.to(lm.device), desc="gradients", leave=False):
            lm.model.zero_grad(set_to_none=True)
            batch = window.unsqueeze(0)
            lm.model(batch, labels=batch, use_cache=False).loss.backward()
            for acc, lin in zip(sq, linears):
                for n, m in lin.items():
                    acc[n] += m.weight.grad.float() ** 2
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return [{n: (a / len(windows)).sqrt() for n, a in acc.items()} for acc in sq]


# ---------------------------------------------------------------- cache

def stats_key(lm: LoadedModel, data: TokenData, mode: str, with_gram: bool, with_grad: bool,
              hook_signature: str = "") -> dict:
    return {"model": lm.name, "calib_data": data.calib_name, "nsamples": data.nsamples,
            "seqlen": data.seqlen, "seed": data.seed, "mode": mode, "gram": with_gram,
            "grad": with_grad, "hook": hook_signature, "dtype": str(next(lm.model.parameters()).dtype),
            # windows themselves, so a changed tokenizer or corpus never reuses stale statistics
            "windows": hashlib.sha1(data.calibration.cpu().numpy().tobytes()).hexdigest()[:16]}


def stats_path(key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / "stats" / f"{digest}.pt"


def calibration_stats(lm: LoadedModel, data: TokenData, mode: str = "one-pass", hook: BlockHook | None = None,
                      with_gram: bool = True, with_grad: bool = False, use_cache: bool = True,
                      batch_size: int = 8) -> CalibrationStats:
    """Statistics for every block, from the disk cache when the same key was computed before.

    Sequential statistics depend on how earlier blocks were pruned, so their key includes the
    hook's signature; the walk also prunes the model, so a cached sequential result is only
    valid for the model the hook already pruned: callers re-run it (use_cache=False)."""
    if mode not in ("one-pass", "sequential"):
        raise ValueError(f"unknown statistics mode {mode!r}: use one-pass or sequential")
    if mode == "sequential" and hook is None:
        raise ValueError("sequential statistics need a pruning hook (they describe a pruned model)")
    key = stats_key(lm, data, mode, with_gram, with_grad, getattr(hook, "signature", ""))
    path = stats_path(key)
    if use_cache and mode == "one-pass" and path.exists():
        return CalibrationStats.load(path)
    blocks = walk(lm, data.calibration, with_gram=with_gram, hook=hook if mode == "sequential" else None,
                  batch_size=batch_size)
    if with_grad:
        for block, grads in zip(blocks, lm_loss_grad_rms(lm, data.calibration)):
            block.grad_rms = grads
    result = CalibrationStats(blocks, key)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        result.save(path)
    return result
