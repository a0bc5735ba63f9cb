"""Compile the FAM-attention kernels for sm_90 exactly as the JIT would, without a GPU, and report
what each kept config becomes: shared memory (Triton's allocation, what the launch requests),
registers and spills (ptxas -v), and how Q/K/V/dO tiles are loaded (16-byte cp.async / ld.global.v4
count versus narrower copies) -- per head dim, next to D = 64.

The arguments are the launchers' own (captured from a call on CPU tensors laid out as diffusers hands
them over), so the pointer-alignment and stride-divisibility specialisation is the JIT's.

    PYTHONPATH=benchmarks python -m srdiff_bench.compile_sm90                       # survey: bf16, D = 40 64 72 80 128 160
    PYTHONPATH=benchmarks python -m srdiff_bench.compile_sm90 --dtype fp16 --head-dims 64 128 --all-configs
"""

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

import srdiff.kernels.fam_attention as K

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = {K._fam_attention_fwd_kernel: "fwd", K._fam_attention_bwd_dkdv_kernel: "dkdv",
           K._fam_attention_bwd_dq_kernel: "dq"}


def captured_launches(dtype: torch.dtype, head_dim: int, B=2, H=8, N=1024, modulated=True):
    """(kernel, args, meta) of every autotuned launch of a forward and backward on (B, N, H, D)
    buffers seen as (B, H, N, D), captured instead of launched; with a (B, 1, N) map and its
    gradient, or (``modulated=False``) without a map."""
    launches = []

    def capture(kernel, grid, args, meta, dtype):
        launches.append((kernel, args, meta))

    q, k, v, do = (torch.randn(B, N, H, head_dim).to(dtype).transpose(1, 2) for _ in range(4))
    fam = torch.rand(B, 1, N) if modulated else None
    real_launch, real_wrap = K._launch, torch.library.wrap_triton
    K._launch = capture
    torch.library.wrap_triton = lambda kernel: _NoLaunch()
    try:
        o, lse2 = K.fam_attention_fwd(q, k, v, fam, 0.5, 0.125)
        K.fam_attention_bwd(do, q, k, v, fam, o, lse2, 0.5, 0.125, modulated)
    finally:
        K._launch, torch.library.wrap_triton = real_launch, real_wrap
    return launches


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def compile_as_jit(fn, args, kwargs):
    """triton.compile with the signature, constexprs and divisibility attributes JITFunction.run
    would derive from these arguments."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers a thread, spill stores in bytes) from triton's own ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", path, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", done.stderr).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", done.stderr).group(1))
    return registers, spills


def load_widths(ptx: str) -> dict[str, int]:
    """Global-memory copies by kind and width: ``"cp.async 16B"`` (global -> shared, pipelined),
    ``"ld.global 16B"`` (-> registers) ... -> instruction count in the PTX."""
    element = {"b8": 1, "b16": 2, "b32": 4, "b64": 8, "f32": 4, "u32": 4, "u16": 2, "f16": 2}
    widths: dict[str, int] = {}
    for vec, kind in re.findall(r"ld\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.(b8|b16|b32|b64|f32|u32|u16|f16)\b", ptx):
        key = f"ld.global {int(vec or 1) * element[kind]}B"
        widths[key] = widths.get(key, 0) + 1
    for nbytes in re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.[A-Za-z0-9_:]+)* \[[^]]+\], \[[^]]+\], (0x[0-9a-f]+|\d+)", ptx):
        key = f"cp.async {int(nbytes, 0)}B"
        widths[key] = widths.get(key, 0) + 1
    return dict(sorted(widths.items()))


def survey(dtype: torch.dtype, head_dims, all_configs: bool):
    rows = []
    for head_dim in head_dims:
        for kernel, args, meta in captured_launches(dtype, head_dim):
            configs = K.kept_configs(kernel, dtype, head_dim, meta["HAS_FAM"])
            for config in configs if all_configs else configs[:1]:
                compiled = compile_as_jit(kernel.fn, args, {**meta, **K.config_options(config)})
                registers, spills = ptxas_report(compiled.asm["ptx"])
                rows.append(dict(kernel=KERNELS[kernel], D=head_dim, config=str(config),
                                 smem=compiled.metadata.shared,
                                 smem_estimate=K.shared_memory_estimate(kernel, config, dtype, head_dim,
                                                                        meta["HAS_FAM"]),
                                 registers=registers, spill_bytes=spills, loads=load_widths(compiled.asm["ptx"])))
                print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[40, 64, 72, 80, 128, 160])
    parser.add_argument("--all-configs", action="store_true", help="every kept config, not only the largest")
    args = parser.parse_args()
    survey(DTYPES[args.dtype], args.head_dims, args.all_configs)


if __name__ == "__main__":
    main()
