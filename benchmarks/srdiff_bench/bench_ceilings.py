"""The two ceilings every other figure is read against (METHOD: measure them, don't quote datasheets):
device copy bandwidth (bytes read + written) and dense matrix-multiply rate, on the machine at hand."""

import pytest
import torch

from srdiff_bench.common import DEVICE, QUICK, measure

COPY_MIB = 1024 if DEVICE == "cuda" else 256
MATMUL_N = 8192 if DEVICE == "cuda" else 1024
MATMUL_DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32]


@pytest.mark.benchmark(group="ceilings")
def test_copy_bandwidth(benchmark):
    n = (64 if QUICK else COPY_MIB) * 2**20 // 4
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    measure(
        benchmark, lambda: dst.copy_(src), op="ceilings", provider="torch.copy_", mode="fwd",
        shape={"MiB": n * 4 // 2**20}, dtype=torch.float32, bytes_moved=2 * n * 4, memory=False,
    )


@pytest.mark.benchmark(group="ceilings")
@pytest.mark.parametrize("dtype", MATMUL_DTYPES, ids=str)
def test_matmul_rate(benchmark, dtype):
    n = 512 if QUICK else MATMUL_N
    a, b = torch.randn(n, n, device=DEVICE, dtype=dtype), torch.randn(n, n, device=DEVICE, dtype=dtype)
    measure(
        benchmark, lambda: a @ b, op="ceilings", provider="torch.matmul", mode="fwd",
        shape={"N": n}, dtype=dtype, flops=2 * n**3, memory=False,
    )
