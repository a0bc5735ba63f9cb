"""srdiff.kernels: the Triton kernels, one op a file (kernel -> launcher -> autograd.Function).

Installed as ``srdiff.kernels`` (see setup.py). Kernels never import the high-level ``srdiff`` layer;
``srdiff`` imports them lazily, so ``import srdiff`` never imports triton.
"""
