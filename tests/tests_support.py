"""Helpers shared by several test files."""
import torch

from autoprune_ray.compress.models import block_linears, decoder_layers


def explicit_linear_inputs(lm, windows):
    """Inputs of every linear, captured from ordinary full forward passes, one window at a time."""
    captured = {}
    handles = []
    for i, block in enumerate(decoder_layers(lm.model)):
        for name, lin in block_linears(block).items():
            def hook(_m, args, _o, key=(i, name)):
                captured.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))
            handles.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for w in windows:
            lm.model(w.unsqueeze(0))
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in captured.items()}
