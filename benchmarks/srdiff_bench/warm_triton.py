"""Compile the attention kernels the GPU benchmarks will autotune, before the timed chunks need them.

    PYTHONPATH=benchmarks python -m srdiff_bench.warm_triton [--jobs 4]

gpu.sh runs this while srdiff._C builds (nvcc keeps a few CPU cores busy; the GPU is idle then). Each
(dtype, head dim) of ``bench_attention.GPU_CASES`` gets its own process, so their cold compiles run
in parallel; every autotune config is compiled there once and lands in Triton's disk cache
(``TRITON_CACHE_DIR``), where the benchmark processes find it: the same constexprs (the benchmark's
fam, lam and grad modes) and the same specialisation (contiguous (B, H, N, D), N a multiple of 16), at
a smaller N, since N is a runtime argument. The autotuner still times the configs per shape in the
benchmark; it no longer compiles them there. Without a GPU this does nothing.
"""

import argparse
import concurrent.futures
import multiprocessing
import time

N_WARM = 1024


def warm(dtype_name: str, D: int, modes: tuple[str, ...]) -> str:
    """Run both of srdiff's attention paths once per mode at (1, 2, N_WARM, D): every autotune config
    of the fused kernels and the prescale kernels compile."""
    import torch

    import srdiff
    from srdiff_bench.bench_attention import FORCED, LAM

    dtype = getattr(torch, dtype_name)
    start = time.perf_counter()
    fam = torch.rand(1, N_WARM, device="cuda")
    for mode in modes:
        grad = mode != "fwd"
        q, k, v = (torch.randn(1, 2, N_WARM, D, device="cuda", dtype=dtype, requires_grad=grad) for _ in range(3))
        for backend in FORCED.values():
            with torch.set_grad_enabled(grad):
                out = srdiff.fam_attention(q, k, v, fam, LAM, check_fam=False, backend=backend)
            if grad:
                torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    torch.cuda.synchronize()
    return f"{dtype_name} D={D} {'/'.join(modes)}: {time.perf_counter() - start:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4, help="processes compiling at once")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("warm_triton: no GPU, nothing to compile")
        return 0
    from srdiff_bench.bench_attention import GPU_CASES

    groups: dict[tuple[str, int], list[str]] = {}
    for case in GPU_CASES:
        dtype, _, D, mode = case.values
        groups.setdefault((str(dtype).replace("torch.", ""), D), []).append(mode)
    start = time.perf_counter()
    spawn = multiprocessing.get_context("spawn")  # CUDA in each worker
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=spawn) as pool:
        futures = [pool.submit(warm, name, D, tuple(dict.fromkeys(modes))) for (name, D), modes in groups.items()]
        for future in concurrent.futures.as_completed(futures):
            print("warm_triton:", future.result(), flush=True)
    print(f"warm_triton: {len(groups)} groups in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
