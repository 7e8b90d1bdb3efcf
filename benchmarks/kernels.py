"""Time the fused pruning kernel against Wanda's sort-based reference and the bandwidth floor.

    python benchmarks/kernels.py              # CUDA: LLaMA-7B linear shapes, fp16
    python benchmarks/kernels.py --shapes 576x576,1536x576 --dtype float32   # CPU: torch paths only

For each weight shape [out, in] it times, on the same device in the same run:
  * wanda-sort: Wanda's published procedure (|W|·sqrt(scaler_row), `torch.sort(stable=True)` of
    every row, scatter of the lowest indices into a mask, zero the weights);
  * torch-reference: our reference (expression evaluation, per-row k-th selection, masked zero);
  * fused (CUDA only): the generated Triton kernel, writing the mask and the pruned weights;
  * floor: bytes the fused kernel must move (read W and the activation norm, write the mask
    and the pruned W) divided by the measured copy bandwidth.
The same program (the Wanda seed) is used throughout, and every mask is checked against the
sort reference before it is timed. Writes benchmarks/results/kernels-<device>.json.
"""
from __future__ import annotations

import json
import platform
import re
import statistics
import time
from pathlib import Path

import click
import torch

from autoprune_ray.kernels.fused import prune_mask, triton_mask
from autoprune_ray.operators.seeds import score_seeds

RESULTS = Path(__file__).parent / "results"
LLAMA7B = "4096x4096,11008x4096,4096x11008"


def wanda_sort(weight: torch.Tensor, scaler_row: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's lib/prune.py procedure, restated: metric, stable sort per row, scatter, zero."""
    metric = weight.abs() * torch.sqrt(scaler_row.reshape(1, -1))
    mask = torch.zeros_like(metric, dtype=torch.bool)
    order = torch.sort(metric, dim=-1, stable=True)[1]
    mask.scatter_(1, order[:, :int(metric.shape[1] * sparsity)], True)
    weight.masked_fill_(mask, 0)   # Wanda writes W[mask] = 0: the same, without a host sync
    return mask


def gpu_ms(fn, device: torch.device, repeats: int) -> float:
    """GPU time alone: `fn` captured in a CUDA graph and replayed, so host work is not counted.
    On the CPU, the median wall time."""
    if device.type != "cuda":
        return timed(fn, device, repeats)
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, rep=repeats)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `fn()` as called (host work included), after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """Bytes per second of a large device copy (read plus write)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = gpu_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() / (ms / 1e3)


def bench_shape(rows: int, cols: int, dtype: torch.dtype, device: torch.device, sparsity: float,
                repeats: int, bandwidth: float) -> dict:
    g = torch.Generator().manual_seed(rows * 7 + cols)
    weight = torch.randn(rows, cols, generator=g).to(dtype).to(device)
    # Wanda's scaler_row is ||X_j||²/n; the language's A is its square root, so both see one metric.
    scaler_row = (torch.rand(cols, generator=g) + 0.05).to(device)
    env = {"W": weight, "A": scaler_row.sqrt().reshape(1, -1)}
    tree = score_seeds()["wanda"].tree
    work = weight.clone()

    expected = wanda_sort(weight.clone(), scaler_row, sparsity)
    backends = ["torch"] + (["triton"] if device.type == "cuda" else [])
    masks = {b: prune_mask(tree, env, sparsity, backend=b, out=work) for b in backends}
    agree = {b: float((m == expected).float().mean()) for b, m in masks.items()}

    row = {"shape": [rows, cols], "dtype": str(dtype).replace("torch.", ""), "sparsity": sparsity,
           "mask_agreement_with_sort": agree}
    row["wanda_sort_ms"] = gpu_ms(lambda: wanda_sort(work.copy_(weight), scaler_row, sparsity), device, repeats)
    row["copy_only_ms"] = gpu_ms(lambda: work.copy_(weight), device, repeats)   # subtracted below
    row["wanda_sort_ms"] -= row["copy_only_ms"]
    row["torch_reference_ms"] = timed(lambda: prune_mask(tree, env, sparsity, backend="torch", out=work),
                                      device, repeats)
    moved = weight.numel() * (2 * weight.element_size() + 1) + cols * 4   # W in, W out, mask out, A in
    row["floor_ms"] = moved / bandwidth * 1e3
    row["timing"] = ("GPU time from CUDA-graph replay (host work excluded) unless named *_call_ms"
                     if device.type == "cuda" else "median wall time on the CPU")
    if "triton" in backends:
        bad = torch.zeros(1, dtype=torch.int32, device=device)
        row["fused_ms_by_num_warps"] = {
            nw: gpu_ms(lambda: triton_mask(tree, env, sparsity, out=work, num_warps=nw, bad_count=bad), device, repeats)
            for nw in (1, 2, 4, 8, 16)}
        row["fused_ms"] = gpu_ms(lambda: triton_mask(tree, env, sparsity, out=work, bad_count=bad), device, repeats)
        row["sort_over_fused"] = row["wanda_sort_ms"] / row["fused_ms"]
        row["fused_over_floor"] = row["fused_ms"] / row["floor_ms"]
        # as called: host work, launch and the NaN check's sync included
        row["fused_call_ms"] = timed(lambda: prune_mask(tree, env, sparsity, backend="triton", out=work), device,
                                     repeats)
    row["sort_over_torch_reference"] = row["wanda_sort_ms"] / row["torch_reference_ms"]
    return row


def device_tag(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}threads"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@click.command()
@click.option("--shapes", default=LLAMA7B, show_default=True, help="comma-separated OUTxIN weight shapes")
@click.option("--dtype", default=None, help="float16 on CUDA, float32 on CPU by default")
@click.option("--sparsity", default=0.5, show_default=True)
@click.option("--repeats", default=None, type=int, help="timed repeats (20 on CUDA, 3 on CPU)")
def main(shapes: str, dtype: str | None, sparsity: float, repeats: int | None) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_t = getattr(torch, dtype or ("float16" if device.type == "cuda" else "float32"))
    repeats = repeats or (20 if device.type == "cuda" else 3)
    bandwidth = copy_bandwidth(device, repeats)
    rows = []
    for spec in shapes.split(","):
        out_f, in_f = (int(x) for x in spec.lower().split("x"))
        rows.append(bench_shape(out_f, in_f, dtype_t, device, sparsity, repeats, bandwidth))
        click.echo(json.dumps(rows[-1]))
    import triton
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "triton": triton.__version__, "copy_bandwidth_GBps": bandwidth / 1e9,
              "program": "wanda seed: |W| * A", "rows": rows,
              "note": "absolute times count only from a GPU; CPU rows compare torch paths in the same run"}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"kernels-{device_tag(device)}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
