"""Test-session setup. Triton kernels run in Triton's CPU interpreter when there is no GPU: the
variable must be set before triton is first imported, which nothing in bnmem_kernels does at import."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
