"""Triton kernels, one module per op. Imported only when the triton backend is chosen."""
