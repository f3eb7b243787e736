"""ghost_norm_linear against autograd per-sample gradients of nn.Linear (a loop of B backward passes)."""
import pytest
import torch

import bnmem_kernels as bk
from bnmem_kernels import testing
from bnmem_kernels.ops.ghost_norm_linear import compiled_op, ghost_norm_linear_triton

# (B, T, d_in, d_out): B = 1, T = 1, odd sizes; both sides of the 2 T^2 < d_in d_out route switch.
SHAPES = [(1, 1, 1, 1), (1, 1, 7, 3), (5, 1, 33, 17), (4, 7, 5, 6), (3, 13, 2, 3), (2, 40, 9, 11), (17, 3, 64, 10)]
ROUTES = ("auto", "gram", "materialize")


def autograd_loop(a: torch.Tensor, d_out: int, seed: int = 0):
    """Per-sample losses of a Linear layer; returns (g = dL/dy, ||dl_i/dW||^2 by B backward passes), fp64."""
    gen = torch.Generator().manual_seed(seed)
    a = a.detach().double()
    layer = torch.nn.Linear(a.shape[-1], d_out, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64))
    c = torch.randn(a.shape[0], a.shape[1], d_out, generator=gen, dtype=torch.float64)
    y = layer(a)
    losses = (c * y + 0.5 * y.square()).sum(dim=(1, 2))          # l_i: sample i only
    g = torch.autograd.grad(losses.sum(), y, retain_graph=True)[0]
    norms = torch.stack([torch.autograd.grad(losses[i], layer.weight, retain_graph=True)[0].square().sum()
                         for i in range(a.shape[0])])
    return g, norms


@pytest.mark.parametrize("device,backend", testing.device_backend_params("ghost_norm_linear"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("route", ROUTES)
def test_fp64_matches_autograd_loop(device, backend, shape, route):
    B, T, din, dout = shape
    a = torch.randn(B, T, din, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g, expected = autograd_loop(a, dout)
    out = bk.ghost_norm_linear(a.to(device), g.to(device), route=route, backend=backend)
    assert out.shape == (B,) and out.dtype == torch.float64 and out.device.type == device
    assert testing.max_rel_err(out, expected) <= testing.RTOL[torch.float64]


@pytest.mark.parametrize("device,backend", testing.device_backend_params("ghost_norm_linear"))
@pytest.mark.parametrize("shape", SHAPES[1:6], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("route", ROUTES)
def test_fp32_matches_fp64_autograd(device, backend, shape, route):
    B, T, din, dout = shape
    a = torch.randn(B, T, din, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g, _ = autograd_loop(a, dout)
    a32, g32 = a.float(), g.float()
    # fp64 truth on the fp32-rounded inputs (the reference equals autograd: test_reference_is_autograd)
    expected = bk.ghost_norm_linear(a32.double(), g32.double(), backend="reference")
    out = bk.ghost_norm_linear(a32.to(device), g32.to(device), route=route, backend=backend)
    assert out.dtype == torch.float32
    assert testing.max_rel_err(out, expected) <= testing.RTOL[torch.float32]


@pytest.mark.parametrize("device,backend", testing.device_backend_params("ghost_norm_linear"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("route", ROUTES)
def test_half_inputs_accumulate_in_fp32(device, backend, dtype, route):
    """fp16/bf16 inputs: products and sums in fp32, result fp32. Against fp64 on the same rounded
    values the error is fp32 accumulation error, so the fp32 tolerance applies (1e-5)."""
    B, T, din, dout = 6, 5, 24, 10
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(B, T, din, generator=gen).to(dtype)
    g = torch.randn(B, T, dout, generator=gen).to(dtype)
    out = bk.ghost_norm_linear(a.to(device), g.to(device), route=route, backend=backend)
    assert out.dtype == torch.float32
    expected = bk.ghost_norm_linear(a.double(), g.double(), backend="reference")
    assert testing.max_rel_err(out, expected) <= testing.RTOL[torch.float32]


def test_bf16_model_end_to_end_within_stated_tolerance():
    """A bf16 Linear end to end (activation gradient g computed in bf16): the norm is within the
    bf16 tolerance (2e-2) of the fp64 autograd loop on the same rounded inputs."""
    B, T, din, dout = 8, 3, 16, 12
    a = torch.randn(B, T, din, generator=torch.Generator().manual_seed(4)).bfloat16()
    g64, expected = autograd_loop(a.double(), dout)
    out = bk.ghost_norm_linear(a, g64.bfloat16())
    assert testing.max_rel_err(out, expected) <= testing.RTOL[torch.bfloat16]


@pytest.mark.parametrize("device,backend", testing.device_backend_params("ghost_norm_linear"))
@pytest.mark.parametrize("route", ROUTES)
def test_non_contiguous_inputs(device, backend, route):
    B, T, din, dout = 3, 6, 7, 5
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(B, din, T, dtype=torch.float64, generator=gen).transpose(1, 2)      # strided rows
    g = torch.randn(B, T, 2 * dout, dtype=torch.float64, generator=gen)[..., ::2]       # stride-2 features
    assert not a.is_contiguous() and not g.is_contiguous()
    expected = bk.ghost_norm_linear(a.contiguous(), g.contiguous(), backend="reference")
    out = bk.ghost_norm_linear(a.to(device), g.to(device), route=route, backend=backend)
    assert testing.max_rel_err(out, expected) <= testing.RTOL[torch.float64]


def test_reference_is_autograd():
    a = torch.randn(4, 5, 6, dtype=torch.float64)
    g, loop = autograd_loop(a, 3)
    for route in ROUTES:
        assert testing.max_rel_err(bk.ghost_norm_linear(a, g, route=route, backend="reference"), loop) < 1e-12


def test_two_dim_inputs_are_T_equals_one():
    a, g = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    expected = a.square().sum(1) * g.square().sum(1)
    assert testing.max_rel_err(bk.ghost_norm_linear(a, g), expected) < 1e-12


@pytest.mark.parametrize("device,backend", testing.device_backend_params("ghost_norm_linear"))
def test_empty_batch_gives_empty_result(device, backend):
    out = bk.ghost_norm_linear(torch.randn(0, 3, 4, device=device), torch.randn(0, 3, 2, device=device), backend=backend)
    assert out.shape == (0,)


@pytest.mark.skipif(bool(testing._backend.unavailable_reason("cpu", "cpu")), reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck_compiled(dtype):
    a, g = torch.randn(3, 4, 5, dtype=dtype), torch.randn(3, 4, 2, dtype=dtype)
    for route in (1, 2):       # 1 = Gram, 2 = materialize; "auto" is decided by the wrapper
        torch.library.opcheck(compiled_op(), (a, g, route))
    with pytest.raises(RuntimeError, match="route must be 1 \\(gram\\) or 2"):
        compiled_op()(a, g, 0)


@pytest.mark.skipif(bool(testing._backend.unavailable_reason("triton", "cpu")), reason="triton unavailable")
def test_opcheck_triton():
    a, g = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    for route in (1, 2):
        torch.library.opcheck(ghost_norm_linear_triton, (a, g, route))
    with pytest.raises(ValueError, match="route must be 1 \\(gram\\) or 2"):
        ghost_norm_linear_triton(a, g, 0)


def test_auto_route_decided_once_in_the_wrapper(monkeypatch):
    """route="auto" is resolved by the wrapper (2 T^2 < d_in d_out -> Gram) and passed to the backend."""
    from bnmem_kernels import _backend
    from bnmem_kernels.ops import ghost_norm_linear as op

    seen = []
    monkeypatch.setitem(_backend.REGISTRY[op.OP], "reference", lambda a, g, route: seen.append(route) or a[:, 0, 0])
    bk.ghost_norm_linear(torch.randn(2, 3, 5), torch.randn(2, 3, 4), backend="reference")    # 18 < 20: Gram
    bk.ghost_norm_linear(torch.randn(2, 4, 5), torch.randn(2, 4, 4), backend="reference")    # 32 >= 20
    bk.ghost_norm_linear(torch.randn(2, 4, 5), torch.randn(2, 4, 4), route="gram", backend="reference")
    assert seen == [op.GRAM, op.MATERIALIZE, op.GRAM]


@pytest.mark.parametrize("a_shape,g_shape,match", [
    ((4,), (4,), "must be"),
    ((2, 3, 4, 5), (2, 3, 4, 5), "must be"),
    ((2, 3, 4), (3, 3, 4), "share B and T"),
    ((2, 3, 4), (2, 5, 4), "share B and T"),
    ((2, 3, 4), (2, 4), "must be"),
])
def test_bad_shapes_raise_value_error(a_shape, g_shape, match):
    with pytest.raises(ValueError, match=match):
        bk.ghost_norm_linear(torch.randn(a_shape), torch.randn(g_shape))


def test_bad_dtypes_raise_type_error():
    with pytest.raises(TypeError, match="floating"):
        bk.ghost_norm_linear(torch.ones(2, 3, 4, dtype=torch.int64), torch.ones(2, 3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="one dtype"):
        bk.ghost_norm_linear(torch.randn(2, 3, 4), torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        bk.ghost_norm_linear([[1.0]], torch.randn(1, 1))


def test_mixed_devices_raise_value_error():
    with pytest.raises(ValueError, match="device"):
        bk.ghost_norm_linear(torch.randn(2, 3, 4), torch.randn(2, 3, 4, device="meta"))


def test_bad_route_and_backend():
    a, g = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="route"):
        bk.ghost_norm_linear(a, g, route="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        bk.ghost_norm_linear(a, g, backend="gpu")
    with pytest.raises(bk.BackendUnavailableError, match="CUDA tensors"):
        bk.ghost_norm_linear(a, g, backend="cuda")
