"""Hot ops of the engine: each op has a torch reference (the CPU path), a Triton kernel
(the CUDA path) and a dispatcher. See kernels/dispatch.py."""
