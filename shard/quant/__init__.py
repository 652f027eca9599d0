"""Weight-only quantization on the CPU: the quantized matrix (weight.py), its C kernels
(kernels.c, built by kernels.py), and the loaders that turn checkpoints into it (loaders.py)."""
