"""A pytest plugin for ``gpu.sh --cpu`` only: lets torch's ``wrap_triton`` take interpreted kernels.

Under ``TRITON_INTERPRET=1``, ``triton.jit`` returns an ``InterpretedFunction``; torch 2.11's
``torch.library.wrap_triton`` accepts only ``JITFunction``/``Autotuner`` and raises ("wrap_triton only
works on functions annotated with triton.jit"), so the GPU image's pair (torch 2.11, triton 3.6) cannot
run srdiff's ``triton_op`` kernels in the interpreter at all. An interpreted kernel needs no tracing
wrapper: this returns it as it is. Compiled kernels, and every torch that accepts interpreted ones,
go through the original. Loaded with ``-p srdiff_bench.rehearsal_shim``; never on a GPU.
"""

import torch.library

_original = torch.library.wrap_triton


def _wrap_triton(kernel):
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    return _original(kernel)


torch.library.wrap_triton = _wrap_triton
