#!/usr/bin/env bash
# On a CUDA machine: the kernel tests compiled (not interpreted), then the kernel benchmarks.
#   bash benchmarks/gpu_checks.sh            (from the repository root, package installed)
set -uo pipefail
nvidia-smi -L
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
TRITON_INTERPRET=0 python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_quant_kernel.py
python benchmarks/kernels.py "$@"
python benchmarks/quant_kernel.py
