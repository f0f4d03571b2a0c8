"""Triton kernels and their launch wrappers, one module per op family (installed as
nf4kern.kernels). No nn.Module and no autograd here.

Each module lists its kernels in COMPILE_SPECS for nf4kern.compile_gate.
"""
