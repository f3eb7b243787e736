"""bn_seeded_backward against autograd of BatchNorm (train mode), one backward per seed."""
import pytest
import torch
import torch.nn.functional as F

from bnmem_kernels import testing
from bnmem_kernels.ops.bn_seeded_backward import bn_seeded_backward, compiled_op

# (B, C, spatial), seeds: B = 1, T = 1 (BN1d), odd sizes, repeated seeds, seeds in any order.
CASES = [((1, 1, ()), [0]), ((1, 3, (2, 2)), [0, 0]), ((2, 5, ()), [1, 0]), ((5, 3, (4, 3)), [0, 3, 3, 4]),
         ((7, 4, (5,)), [6, 2, 0]), ((3, 2, (9, 7)), [2, 1, 0, 1, 2])]


def _autograd(z, gamma, dy, seeds, eps=1e-5):
    """Per seed s: autograd.grad of <dy_s, y_{seeds[s]}> w.r.t. the BN input z (all samples)."""
    z = z.detach().requires_grad_(True)
    if z.numel() // z.shape[1] > 1:
        y = F.batch_norm(z, None, None, gamma, None if gamma is None else torch.zeros_like(gamma), training=True,
                         eps=eps)
    else:   # M = 1: F.batch_norm refuses it; the same definition written out
        dims = [0] + list(range(2, z.dim()))
        mu, var = z.mean(dims, keepdim=True), z.var(dims, unbiased=False, keepdim=True)
        y = (z - mu) / (var + eps).sqrt() * (1 if gamma is None else gamma.view(1, -1, *[1] * (z.dim() - 2)))
    out = []
    for s, i in enumerate(seeds):
        G = torch.zeros_like(y)
        G[i] = dy[s]
        out.append(torch.autograd.grad(y, z, G, retain_graph=True)[0])
    return torch.stack(out)


def _inputs(shape, seeds, dtype, gen_seed=0, affine=True):
    B, C, sp = shape
    gen = torch.Generator().manual_seed(gen_seed)
    z = 2 * torch.randn(B, C, *sp, generator=gen, dtype=torch.float64) + 0.5
    gamma = torch.randn(C, generator=gen, dtype=torch.float64) if affine else None
    dy = torch.randn(len(seeds), C, *sp, generator=gen, dtype=torch.float64)
    dims = [0] + list(range(2, z.dim()))
    mu, var = z.mean(dims, keepdim=True), z.var(dims, unbiased=False, keepdim=True)
    sigma = (var + 1e-5).sqrt()
    xhat = (z - mu) / sigma
    scale = (gamma if affine else torch.ones(C, dtype=torch.float64)) / sigma.flatten()
    return z, gamma, dy, xhat, scale


@pytest.mark.parametrize("device,backend", testing.device_backend_params())
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}x{'x'.join(map(str, c[0][2])) or '1'}")
@pytest.mark.parametrize("affine", [True, False])
def test_fp64_matches_autograd(device, backend, case, affine):
    shape, seeds = case
    z, gamma, dy, xhat, scale = _inputs(shape, seeds, torch.float64, affine=affine)
    expected = _autograd(z, gamma, dy, seeds)
    dz, a, b = bn_seeded_backward(xhat.to(device), scale.to(device), dy.to(device),
                                  torch.tensor(seeds, device=device), backend=backend)
    assert dz.shape == (len(seeds),) + tuple(z.shape) and dz.dtype == torch.float64
    scale_ref = (expected.abs().max() + 1e-300)
    assert ((dz.cpu() - expected).abs().max() / scale_ref).item() <= testing.RTOL[torch.float64]
    M = z.numel() // z.shape[1]
    for s, i in enumerate(seeds):
        a_ref = dy[s].reshape(z.shape[1], -1).sum(1) / M
        b_ref = (dy[s] * xhat[i]).reshape(z.shape[1], -1).sum(1) / M
        torch.testing.assert_close(a[s].cpu(), a_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b[s].cpu(), b_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("device,backend", testing.device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_against_fp64(device, backend, dtype):
    """fp32/bf16/fp16 inputs, fp32 accumulation; vs fp64 on the same rounded inputs. The output is
    stored in the input dtype, so the tolerance is that dtype's (fp32 1e-5, bf16 2e-2, fp16 5e-3),
    relative to the largest entry (entries near zero are differences of O(1) terms)."""
    shape, seeds = (6, 5, (3, 4)), [5, 0, 2]
    _, _, dy, xhat, scale = _inputs(shape, seeds, torch.float64, gen_seed=1)
    xl, sl, gl = xhat.to(dtype), scale.to(dtype), dy.to(dtype)
    exp, ea, eb = bn_seeded_backward(xl.double(), sl.double(), gl.double(), seeds, backend="reference")
    dz, a, b = bn_seeded_backward(xl.to(device), sl.to(device), gl.to(device), seeds, backend=backend)
    assert dz.dtype == dtype
    for out, ref in ((dz, exp), (a, ea), (b, eb)):
        err = ((out.cpu().double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= testing.RTOL[dtype], err


@pytest.mark.parametrize("device,backend", testing.device_backend_params())
def test_noncontiguous_inputs(device, backend):
    shape, seeds = (4, 3, (5, 2)), [3, 1]
    z, gamma, dy, xhat, scale = _inputs(shape, seeds, torch.float64, gen_seed=2)
    expected = _autograd(z, gamma, dy, seeds)
    xt = xhat.transpose(2, 3).contiguous().transpose(2, 3)          # same values, other strides
    gt = dy.transpose(0, 1).contiguous().transpose(0, 1)
    st = torch.stack([scale, scale], 1)[:, 0]
    assert not xt.is_contiguous() and not gt.is_contiguous() and not st.is_contiguous()
    dz, _, _ = bn_seeded_backward(xt.to(device), st.to(device), gt.to(device), seeds, backend=backend)
    torch.testing.assert_close(dz.cpu(), expected, rtol=1e-10, atol=1e-12)


def test_empty_seed_set():
    _, _, _, xhat, scale = _inputs((3, 2, (4,)), [0], torch.float64)
    for be in ("reference", "cpu"):
        dz, a, b = bn_seeded_backward(xhat, scale, xhat.new_zeros(0, 2, 4), [], backend=be)
        assert dz.shape == (0, 3, 2, 4) and a.shape == (0, 2) and b.shape == (0, 2)


@pytest.mark.parametrize("kw,exc,msg", [
    ({"xhat": "list"}, TypeError, "xhat must be a torch.Tensor"),
    ({"dtype_dy": torch.float32}, TypeError, "cast them to one dtype"),
    ({"scale_shape": 3}, ValueError, "scale must be"),
    ({"dy_shape": (2, 2, 5)}, ValueError, "dy must be"),
    ({"seeds": [0, 4]}, ValueError, r"seeds must be sample indices in \[0, 3\)"),
    ({"seeds": torch.tensor([0.0, 1.0])}, TypeError, "integer"),
])
def test_bad_input(kw, exc, msg):
    _, _, dy, xhat, scale = _inputs((3, 2, (4,)), [0, 1], torch.float64)
    args = dict(xhat=xhat, scale=scale, dy=dy, seeds=kw.get("seeds", [0, 1]))
    if kw.get("xhat") == "list":
        args["xhat"] = xhat.tolist()
    if "dtype_dy" in kw:
        args["dy"] = dy.float()
    if "scale_shape" in kw:
        args["scale"] = torch.ones(kw["scale_shape"], dtype=torch.float64)
    if "dy_shape" in kw:
        args["dy"] = torch.zeros(kw["dy_shape"], dtype=torch.float64)
    with pytest.raises(exc, match=msg):
        bn_seeded_backward(**args)


def test_opcheck_compiled():
    _, _, dy, xhat, scale = _inputs((3, 2, (4,)), [2, 0], torch.float64)
    x3, g3 = xhat.reshape(3, 2, 4), dy.reshape(2, 2, 4)
    torch.library.opcheck(compiled_op(), (x3, scale, g3, torch.tensor([2, 0])),
                          test_utils=("test_schema", "test_faketensor"))
