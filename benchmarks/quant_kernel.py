"""Time weight-only fake quantization: the torch reference against the fused Triton kernel.

    python benchmarks/quant_kernel.py                 # CUDA: fp16, both paths; CPU: float32, torch only
    python benchmarks/quant_kernel.py --shapes 576x576 --bits 4 --repeats 5

For each weight shape [out, in] and bit width (group size 128 by default) it times, on the same
device in the same run:
  * torch: `fake_quantize(..., backend="torch")`, the reference (pad, group min/max, round, error);
  * fused (CUDA only): the Triton kernel writing into a preallocated output, once without and once
    with the h weights of the error, and `fake_quantize` as called (allocation and launch included);
  * floor: bytes the kernel must move (read W, write deq and the row errors) over the measured
    copy bandwidth.
The kernel's result is checked against the reference before it is timed. On the CPU only the
torch path is timed: the Triton interpreter is for tests, not speed. Times are medians.
Writes benchmarks/results/quant-kernel-<device>.json.
"""
from __future__ import annotations

import importlib.util
import json
import platform
from pathlib import Path

import click
import torch

from autoprune_ray.kernels.quant import fake_quantize, triton_fake_quantize

HERE = Path(__file__).parent
RESULTS = HERE / "results"
SHAPES = "576x576,1536x576,576x1536,4096x4096"   # SmolLM2-135M's q/o, up/gate, down; a LLaMA-7B one


def _kernel_benchmark():
    """benchmarks/kernels.py by path: a plain `import kernels` could mean the package directory."""
    spec = importlib.util.spec_from_file_location("_benchmarks_kernels", HERE / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _kernel_benchmark()


def median_ms(fn, device: torch.device, repeats: int) -> float:
    """GPU time alone, the median over 100 ms of CUDA-graph replays of `fn` (host
    work not counted); on the CPU, the median wall time of `repeats` calls. benchmarks/kernels.py's
    gpu_ms reports the mean on CUDA, hence this one."""
    if device.type != "cuda":
        return bench.timed(fn, device, repeats)
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def fused_agreement(weight: torch.Tensor, bits: int, group_size: int) -> dict:
    """How far the kernel is from the reference: exact on the interpreter, near-exact compiled."""
    deq, err = triton_fake_quantize(weight, bits, group_size)
    ref, ref_err = fake_quantize(weight, bits, group_size, backend="torch")
    return {"deq_equal_fraction": float((deq == ref).float().mean()),
            "row_err_max_rel_diff": float(((err - ref_err).abs() / ref_err.clamp_min(1e-30)).max())}


def bench_shape(rows: int, cols: int, bits: int, group_size: int, dtype: torch.dtype, device: torch.device,
                repeats: int, bandwidth: float) -> dict:
    g = torch.Generator().manual_seed(rows * 7 + cols)
    weight = torch.randn(rows, cols, generator=g).to(dtype).to(device)
    h = (torch.rand(cols, generator=g) + 0.05).to(device)
    row = {"shape": [rows, cols], "bits": bits, "group_size": group_size, "dtype": str(dtype).replace("torch.", "")}
    row["torch_ms"] = median_ms(lambda: fake_quantize(weight, bits, group_size, backend="torch"), device, repeats)
    row["floor_ms"] = (2 * weight.numel() * weight.element_size() + rows * 4) / bandwidth * 1e3
    if device.type == "cuda":
        row.update(fused_agreement(weight, bits, group_size))
        out = torch.empty_like(weight)
        row["fused_ms"] = median_ms(lambda: triton_fake_quantize(weight, bits, group_size, out=out), device,
                                       repeats)
        row["fused_with_h_ms"] = median_ms(lambda: triton_fake_quantize(weight, bits, group_size, h, out=out),
                                              device, repeats)
        # as called: argument checks, allocation and launch included
        row["fused_call_ms"] = bench.timed(lambda: fake_quantize(weight, bits, group_size), device, repeats)
        row["torch_over_fused"] = row["torch_ms"] / row["fused_ms"]
        row["fused_over_floor"] = row["fused_ms"] / row["floor_ms"]
    return row


@click.command()
@click.option("--shapes", default=SHAPES, show_default=True, help="comma-separated OUTxIN weight shapes")
@click.option("--bits", default="3,4", show_default=True, help="comma-separated bit widths")
@click.option("--group-size", default=128, show_default=True)
@click.option("--dtype", default=None, help="float16 on CUDA, float32 on CPU by default")
@click.option("--repeats", default=None, type=int, help="timed repeats (20 on CUDA, 5 on CPU)")
def main(shapes: str, bits: str, group_size: int, dtype: str | None, repeats: int | None) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_t = getattr(torch, dtype or ("float16" if device.type == "cuda" else "float32"))
    repeats = repeats or (20 if device.type == "cuda" else 5)
    bandwidth = bench.copy_bandwidth(device, repeats)
    rows = []
    for spec in shapes.split(","):
        out_f, in_f = (int(x) for x in spec.lower().split("x"))
        for b in (int(x) for x in bits.split(",")):
            rows.append(bench_shape(out_f, in_f, b, group_size, dtype_t, device, repeats, bandwidth))
            click.echo(json.dumps(rows[-1]))
    import triton
    on_gpu = device.type == "cuda"
    result = {"device": torch.cuda.get_device_name(device) if on_gpu else f"cpu-{torch.get_num_threads()}threads",
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "triton": triton.__version__, "copy_bandwidth_GBps": bandwidth / 1e9, "repeats": repeats,
              "timing": ("ms; GPU time from CUDA-graph replay (host work excluded) except fused_call_ms, the "
                         "median of the call as made" if on_gpu else "median wall ms of the call on the CPU"),
              "note": ("" if on_gpu else "CPU run: only the torch path is timed; the Triton kernel runs here "
                       "only under the interpreter, which is for tests, not speed"),
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"quant-kernel-{bench.device_tag(device)}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
