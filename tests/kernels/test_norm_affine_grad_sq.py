"""norm_affine_grad_sq against autograd per-sample gradients of the affine parameters, every backend."""
import pytest
import torch

import bnmem_kernels as bk
from bnmem_kernels import testing
from bnmem_kernels.ops.norm_affine_grad_sq import compiled_op, norm_affine_grad_sq_triton

# layout name -> (B, C, S, stats shape): BN per channel, IN/GN per (sample, channel), LN per (sample, position)
LAYOUTS = {
    "bn": (5, 7, 9, lambda B, C, S: (1, C, 1)),
    "in": (3, 5, 13, lambda B, C, S: (B, C, 1)),
    "ln": (4, 6, 3, lambda B, C, S: (B, 1, S)),
    "b1": (1, 3, 11, lambda B, C, S: (1, C, 1)),
    "s1": (6, 9, 1, lambda B, C, S: (1, C, 1)),
}


def _inputs(layout, dtype=torch.float64, seed=0, noncontig=False):
    B, C, S, st = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    if noncontig:   # every other element of a wider tensor, then a transpose back: strided x and dy
        x = torch.randn(B, S, 2 * C, generator=gen, dtype=torch.float64)[:, :, ::2].transpose(1, 2).to(dtype)
        dy = torch.randn(B, S, 2 * C, generator=gen, dtype=torch.float64)[:, :, ::2].transpose(1, 2).to(dtype)
    else:
        x = torch.randn(B, C, S, generator=gen, dtype=torch.float64).to(dtype)
        dy = torch.randn(B, C, S, generator=gen, dtype=torch.float64).to(dtype)
    mean = torch.randn(st(B, C, S), generator=gen, dtype=torch.float64)
    rstd = torch.rand(st(B, C, S), generator=gen, dtype=torch.float64) + 0.5
    return x, dy, mean, rstd


def autograd_truth(x, dy, mean, rstd):
    """fp64 autograd: y = gamma_i * xhat + beta_i with per-sample copies of gamma/beta."""
    x, dy = x.double(), dy.double()
    B, C, _ = x.shape
    gamma = torch.ones(B, C, 1, dtype=torch.float64, requires_grad=True)
    beta = torch.zeros(B, C, 1, dtype=torch.float64, requires_grad=True)
    y = gamma * ((x - mean.double()) * rstd.double()) + beta
    dg, db = torch.autograd.grad((y * dy).sum(), [gamma, beta])
    return torch.stack([dg.square().sum(dim=(1, 2)), db.square().sum(dim=(1, 2))], dim=1)


@pytest.mark.parametrize("device,backend", testing.device_backend_params("norm_affine_grad_sq"))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "strided"])
def test_fp64_matches_autograd(device, backend, layout, noncontig):
    x, dy, mean, rstd = _inputs(layout, noncontig=noncontig)
    out = bk.norm_affine_grad_sq(x.to(device), dy.to(device), mean.to(device), rstd.to(device), backend=backend)
    assert out.shape == (x.shape[0], 2) and out.dtype == torch.float64
    assert testing.max_rel_err(out, autograd_truth(x, dy, mean, rstd)) <= testing.RTOL[torch.float64]


@pytest.mark.parametrize("device,backend", testing.device_backend_params("norm_affine_grad_sq"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bn", "ln"])
def test_low_precision_accumulates_in_fp32(device, backend, dtype, layout):
    """fp32/bf16/fp16 x, dy: fp32 accumulation; against fp64 on the same rounded values the fp32
    tolerance (1e-5) applies."""
    x, dy, mean, rstd = _inputs(layout, dtype=dtype, seed=1)
    out = bk.norm_affine_grad_sq(x.to(device), dy.to(device), mean.float().to(device), rstd.float().to(device),
                                 backend=backend)
    assert out.dtype == torch.float32
    expected = autograd_truth(x, dy, mean.float(), rstd.float())
    assert testing.max_rel_err(out, expected) <= testing.RTOL[torch.float32]


@pytest.mark.parametrize("isa", ["auto", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_cpu_long_rows_both_isas(monkeypatch, isa, dtype):
    """Long contiguous rows (odd length: vector body + remainder) through the CPU kernel's run-time
    picked build and its baseline build (BNMEM_CPU_ISA=baseline), BN and GN-like statistics."""
    if isa == "baseline":
        monkeypatch.setenv("BNMEM_CPU_ISA", "baseline")
    gen = torch.Generator().manual_seed(5)
    B, C, S = 3, 4, 1037
    x = (torch.randn(B, C, S, generator=gen, dtype=torch.float64) * 3 + 1).to(dtype)
    dy = torch.randn(B, C, S, generator=gen, dtype=torch.float64).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for shape in ((1, C, 1), (B, C, 1)):
        mean = torch.randn(shape, generator=gen, dtype=torch.float64).to(acc)
        rstd = (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5).to(acc)
        out = bk.norm_affine_grad_sq(x, dy, mean, rstd, backend="cpu")
        assert testing.max_rel_err(out, autograd_truth(x, dy, mean, rstd)) <= testing.RTOL[acc]


def test_bad_inputs_raise_clear_errors():
    x, dy, mean, rstd = _inputs("bn")
    with pytest.raises(ValueError, match=r"\[B, C, S\]"):
        bk.norm_affine_grad_sq(x[0], dy[0], mean, rstd)
    with pytest.raises(ValueError, match="mean must broadcast"):
        bk.norm_affine_grad_sq(x, dy, torch.zeros(3), rstd)
    with pytest.raises(TypeError, match="dy"):
        bk.norm_affine_grad_sq(x, dy.float(), mean, rstd)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        bk.norm_affine_grad_sq(None, dy, mean, rstd)


def test_opcheck_compiled():
    if testing._backend.unavailable_reason("cpu", "cpu"):
        pytest.skip("compiled extension unavailable")
    op = compiled_op()
    for layout in ("bn", "ln"):
        for dtype in (torch.float64, torch.float32):
            x, dy, mean, rstd = _inputs(layout, dtype=dtype)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            torch.library.opcheck(op, (x, dy, mean.to(acc).expand(x.shape), rstd.to(acc).expand(x.shape)))


def test_opcheck_triton():
    if testing._backend.unavailable_reason("triton", "cpu"):
        pytest.skip("triton unavailable on CPU (needs TRITON_INTERPRET=1)")
    x, dy, mean, rstd = _inputs("in")
    torch.library.opcheck(norm_affine_grad_sq_triton, (x, dy, mean.expand(x.shape), rstd.expand(x.shape)))
