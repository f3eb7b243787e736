"""pooled_conv_weight_grad on a GPU checks idx without a host sync (the exact chain calls it 8 times a
step), and still refuses out-of-range entries. Needs CUDA; skipped elsewhere."""
import pytest
import torch

from bnmem_kernels import _backend
from bnmem_kernels.ops.pooled_conv_weight_grad import pooled_conv_weight_grad

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, 6, generator=g, dtype=dtype)
    vals = torch.randn(6, 5, 3, 4, generator=g, dtype=dtype)
    idx = torch.randint(0, 16, (3, 6, 4), generator=g)
    return x.cuda(), vals.cuda(), idx.cuda()


@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_no_host_sync(backend):
    if _backend.unavailable_reason(backend, torch.device("cuda")):
        pytest.skip(_backend.unavailable_reason(backend, torch.device("cuda")))
    x, vals, idx = _inputs()
    pooled_conv_weight_grad(x, vals, idx, (4, 4), 3, backend=backend)  # warm-up: loads, compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pooled_conv_weight_grad(x, vals, idx, (4, 4), 3, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cpu_out_of_range_raises():
    x, vals, idx = (t.cpu() for t in _inputs()) if torch.cuda.is_available() else _cpu_inputs()
    idx[0, 0, 0] = 16
    with pytest.raises(ValueError, match="idx entries"):
        pooled_conv_weight_grad(x, vals, idx, (4, 4), 3, backend="reference")


def _cpu_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 4, 6, 6, generator=g), torch.randn(6, 5, 3, 4, generator=g),
            torch.randint(0, 16, (3, 6, 4), generator=g))
