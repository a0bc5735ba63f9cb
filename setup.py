"""Build srdiff: the Python packages plus the C++/CUDA extension ``srdiff._C``.

Environment flags (each is echoed at build time):
  SRDIFF_SKIP_EXT=1   build no extension; srdiff then runs its pure-PyTorch references.
  FORCE_CUDA=1        build the CUDA backend even when no GPU is visible (CI, wheel builds).
                      Set TORCH_CUDA_ARCH_LIST explicitly then, e.g. "8.0;9.0".
  DEBUG=1             -O0 -g for both the host and the device compiler.
  NVCC_FLAGS="..."    extra nvcc flags, appended.
  MAX_JOBS=N          parallel compile jobs (read by torch's BuildExtension/ninja).
"""

import importlib.util
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
os.chdir(ROOT)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


SKIP_EXT = _flag("SRDIFF_SKIP_EXT")
FORCE_CUDA = _flag("FORCE_CUDA")
DEBUG = _flag("DEBUG")
NVCC_FLAGS = os.environ.get("NVCC_FLAGS", "").split()
BUILD_CUDA = (torch.cuda.is_available() and CUDA_HOME is not None) or FORCE_CUDA

for name, value in [
    ("SRDIFF_SKIP_EXT", SKIP_EXT),
    ("FORCE_CUDA", FORCE_CUDA),
    ("DEBUG", DEBUG),
    ("NVCC_FLAGS", NVCC_FLAGS),
    ("MAX_JOBS", os.environ.get("MAX_JOBS")),
    ("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST")),
    ("CUDA_HOME", CUDA_HOME),
    ("torch", torch.__version__),
    ("=> BUILD_CUDA", BUILD_CUDA and not SKIP_EXT),
]:
    print(f"[srdiff setup] {name}: {value}")


def _load_sources_module():
    """srdiff/_sources.py, loaded by path: the package itself is not importable before it is built."""
    spec = importlib.util.spec_from_file_location("_srdiff_sources", os.path.join(ROOT, "srdiff", "_sources.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extensions():
    if SKIP_EXT:
        return []
    sources_module = _load_sources_module()
    # Paths relative to this file, as setuptools wants them.
    sources, cuda_sources, _ = sources_module.extension_sources(ROOT)
    digest = sources_module.sources_digest(ROOT)

    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    define_macros = [
        ("SRDIFF_SOURCES_DIGEST", f'"{digest}"'),
        ("SRDIFF_TORCH_VERSION", f'"{torch.__version__}"'),
        ("SRDIFF_WITH_CUDA", "1" if BUILD_CUDA else "0"),
    ]
    # -fno-math-errno: sqrt needs no errno, so its loops vectorise (the noise stream's Box-Muller).
    extra_compile_args = {"cxx": opt + ["-fopenmp", "-fno-math-errno"]}
    kwargs = dict(
        name="srdiff._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if BUILD_CUDA:
        extra_compile_args["nvcc"] = opt + ["-lineinfo"] + NVCC_FLAGS
        return [CUDAExtension(**{**kwargs, "sources": sources + cuda_sources})]
    return [CppExtension(**kwargs)]


setup(
    # srdiff and its subpackages, the Triton kernels (srdiff/kernels/) among them: no other top-level name.
    packages=find_packages(include=["srdiff", "srdiff.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
