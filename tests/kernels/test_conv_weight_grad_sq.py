"""conv_weight_grad_sq against autograd per-sample Conv2d weight gradients (a loop over the samples),
every backend (Triton under the interpreter, CUDA skips without a GPU)."""
import pytest
import torch
import torch.nn.functional as F

import bnmem_kernels as bk
from bnmem_kernels import testing
from bnmem_kernels.ops.conv_weight_grad_sq import compiled_op, conv_weight_grad_sq_triton

# name -> (B, C_in, Hp, Wp, C_out, kernel_size, stride, dilation, groups); x already padded
CASES = {
    "b1": (1, 3, 10, 12, 16, (3, 3), (1, 1), (1, 1), 1),
    "odd": (3, 5, 11, 9, 7, (3, 2), (1, 1), (1, 1), 1),
    "stride2": (2, 4, 13, 12, 6, (3, 3), (2, 2), (1, 1), 1),
    "dilation2": (2, 3, 12, 11, 5, (3, 3), (1, 1), (2, 2), 1),
    "groups2": (2, 4, 9, 10, 6, (3, 3), (2, 1), (1, 1), 2),
    "depthwise": (2, 6, 8, 9, 6, (3, 3), (1, 1), (1, 1), 6),
    "mixed": (2, 6, 13, 15, 9, (3, 3), (1, 2), (2, 1), 3),
    "conv1d": (3, 4, 1, 23, 5, (1, 5), (1, 2), (1, 1), 1),
    "1x1": (2, 4, 6, 7, 3, (1, 1), (1, 1), (1, 1), 1),
    "rows": (2, 3, 7, 40, 5, (3, 3), (1, 1), (1, 15), 1),   # wide dilation: the CPU kernel's row-by-row layout
}
COMPILED = ("cpu", "reference")   # big shapes: not through the Triton interpreter


def out_size(case):
    B, C, Hp, Wp, Co, ks, st, dil, gr = case
    return tuple((n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip((Hp, Wp), ks, st, dil))


def make(case, dtype=torch.float64, seed=0):
    B, C, Hp, Wp, Co, ks, st, dil, gr = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, Hp, Wp, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(B, Co, *out_size(case), generator=gen, dtype=torch.float64).to(dtype)
    return x, g


def autograd_truth(x, g, case):
    """||dW_i||^2 by autograd, one sample at a time, fp64: dW_i = d<conv(x_i, W), g_i>/dW."""
    B, C, Hp, Wp, Co, ks, st, dil, gr = case
    w = torch.zeros(Co, C // gr, *ks, dtype=torch.float64, requires_grad=True)
    out = []
    for i in range(x.shape[0]):
        y = F.conv2d(x[i:i + 1].double(), w, stride=st, dilation=dil, groups=gr)
        out.append(torch.autograd.grad(y, w, g[i:i + 1].double())[0].square().sum())
    return torch.stack(out)


def call(x, g, case, backend):
    B, C, Hp, Wp, Co, ks, st, dil, gr = case
    return bk.conv_weight_grad_sq(x, g, ks, st, dil, gr, backend=backend)


@pytest.mark.parametrize("device,backend", testing.device_backend_params("conv_weight_grad_sq"))
@pytest.mark.parametrize("name", list(CASES))
def test_fp64_matches_autograd(device, backend, name):
    case = CASES[name]
    x, g = make(case)
    out = call(x.to(device), g.to(device), case, backend)
    assert out.shape == (case[0],) and out.dtype == torch.float64 and out.device.type == device
    assert testing.max_rel_err(out, autograd_truth(x, g, case)) <= testing.RTOL[torch.float64]


@pytest.mark.parametrize("device,backend", testing.device_backend_params("conv_weight_grad_sq"))
@pytest.mark.parametrize("name", ["odd", "stride2", "groups2", "mixed", "conv1d"])
def test_fp32_matches_fp64_autograd(device, backend, name):
    case = CASES[name]
    x, g = make(case, torch.float32, seed=1)
    out = call(x.to(device), g.to(device), case, backend)
    assert out.dtype == torch.float32
    assert testing.max_rel_err(out, autograd_truth(x, g, case)) <= testing.RTOL[torch.float32]


@pytest.mark.parametrize("device,backend", testing.device_backend_params("conv_weight_grad_sq"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["odd", "mixed"])
def test_half_inputs_accumulate_in_fp32(device, backend, dtype, name):
    """fp16/bf16 inputs: products and sums in fp32, result fp32. Against fp64 autograd on the same
    rounded values the error is fp32 accumulation error, so the fp32 tolerance applies (1e-5)."""
    case = CASES[name]
    x, g = make(case, dtype, seed=2)
    out = call(x.to(device), g.to(device), case, backend)
    assert out.dtype == torch.float32
    assert testing.max_rel_err(out, autograd_truth(x, g, case)) <= testing.RTOL[torch.float32]


def test_bf16_layer_end_to_end_within_stated_tolerance():
    """A bf16 conv end to end (output gradient computed in bf16 from a bf16 forward): the norm is
    within the bf16 tolerance (2e-2) of the fp64 autograd loop on the same rounded input."""
    case = CASES["odd"]
    x, _ = make(case, torch.bfloat16, seed=3)
    B, C, Hp, Wp, Co, ks, st, dil, gr = case
    w = torch.randn(Co, C // gr, *ks, generator=torch.Generator().manual_seed(4)).bfloat16()
    y = F.conv2d(x, w, stride=st, dilation=dil, groups=gr)
    g = y * 0.5 + 1                                 # dl/dy of l = 0.25 y^2 + y, in bf16
    g64 = y.double() * 0.5 + 1
    out = call(x, g, case, None)
    assert testing.max_rel_err(out, autograd_truth(x, g64, case)) <= testing.RTOL[torch.bfloat16]


@pytest.mark.parametrize("device,backend", testing.device_backend_params("conv_weight_grad_sq"))
@pytest.mark.parametrize("name", ["stride2", "mixed"])
def test_non_contiguous_inputs(device, backend, name):
    case = CASES[name]
    x, g = make(case, seed=5)
    xs = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)             # channels-last
    gs = torch.stack([g, torch.zeros_like(g)], dim=-1)[..., 0]              # stride-2 last dim
    assert not xs.is_contiguous() and not gs.is_contiguous()
    out = call(xs.to(device), gs.to(device), case, backend)
    assert testing.max_rel_err(out, autograd_truth(x, g, case)) <= testing.RTOL[torch.float64]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("shape", [(4, 3, 34, 34, 16, (3, 3), (1, 1), (1, 1), 1),      # flat layout, one pass
                                   (3, 5, 50, 50, 6, (3, 3), (1, 1), (1, 1), 1),       # flat, L > one chunk (2048)
                                   (2, 2, 300, 40, 3, (3, 3), (1, 1), (1, 15), 1)],     # rows, several row chunks
                         ids=["cifar", "big", "tall"])
def test_large_shapes_fp64(backend, shape):
    x, g = make(shape, seed=6)
    out = call(x, g, shape, backend)
    assert testing.max_rel_err(out, autograd_truth(x, g, shape)) <= testing.RTOL[torch.float64]


@pytest.mark.skipif(bool(testing._backend.unavailable_reason("cpu", "cpu")), reason="extension not built")
@pytest.mark.parametrize("name", ["odd", "mixed", "rows", "depthwise"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cpu_baseline_isa(monkeypatch, name, dtype):
    """The CPU kernel's SSE2 build (the run-time pick on CPUs without AVX2/FMA), forced."""
    monkeypatch.setenv("BNMEM_CPU_ISA", "baseline")
    case = CASES[name]
    x, g = make(case, dtype, seed=9)
    out = call(x, g, case, "cpu")
    assert testing.max_rel_err(out, autograd_truth(x, g, case)) <= testing.RTOL[dtype]


def test_matches_padded_conv_layers():
    """A real nn.Conv2d (padding 1, bias) and nn.Conv1d ('same'): x padded as the layer pads it
    (1-D as H = 1) gives the per-sample weight-gradient norms of autograd."""
    torch.manual_seed(7)
    for layer, x in ((torch.nn.Conv2d(3, 8, 3, padding=1, stride=2).double(), torch.randn(3, 3, 9, 8, dtype=torch.float64)),
                     (torch.nn.Conv1d(4, 6, 5, padding="same", dilation=2).double(), torch.randn(3, 4, 17, dtype=torch.float64))):
        y = layer(x)
        c = torch.randn_like(y)
        g = torch.autograd.grad((c * y).sum(), y)[0]
        truth = torch.stack([torch.autograd.grad((c[i] * layer(x[i:i + 1])[0]).sum(), layer.weight)[0].square().sum()
                             for i in range(x.shape[0])])
        xp = F.pad(x, layer._reversed_padding_repeated_twice)
        if x.dim() == 3:
            xp, g = xp.unsqueeze(2), g.unsqueeze(2)
            ks, st, dil = (1,) + layer.kernel_size, (1,) + layer.stride, (1,) + layer.dilation
        else:
            ks, st, dil = layer.kernel_size, layer.stride, layer.dilation
        for backend in COMPILED:
            out = bk.conv_weight_grad_sq(xp, g, ks, st, dil, layer.groups, backend=backend)
            assert testing.max_rel_err(out, truth) <= testing.RTOL[torch.float64]


def test_reference_is_autograd():
    for name in ("mixed", "depthwise", "conv1d"):
        x, g = make(CASES[name], seed=8)
        assert testing.max_rel_err(call(x, g, CASES[name], "reference"), autograd_truth(x, g, CASES[name])) < 1e-12


@pytest.mark.parametrize("device,backend", testing.device_backend_params("conv_weight_grad_sq"))
def test_empty_batch_gives_empty_result(device, backend):
    out = bk.conv_weight_grad_sq(torch.randn(0, 3, 6, 6, device=device), torch.randn(0, 4, 4, 4, device=device), 3,
                                 backend=backend)
    assert out.shape == (0,)


@pytest.mark.parametrize("device,backend", testing.device_backend_params("conv_weight_grad_sq"))
def test_no_output_channels_gives_zeros(device, backend):
    out = bk.conv_weight_grad_sq(torch.randn(2, 3, 6, 6, device=device), torch.randn(2, 0, 4, 4, device=device), 3,
                                 backend=backend)
    assert out.shape == (2,) and not out.any()


@pytest.mark.skipif(bool(testing._backend.unavailable_reason("cpu", "cpu")), reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck_compiled(dtype):
    x, g = make(CASES["mixed"], dtype)
    torch.library.opcheck(compiled_op(), (x, g, [3, 3], [1, 2], [2, 1], 3))


@pytest.mark.skipif(bool(testing._backend.unavailable_reason("triton", "cpu")), reason="triton unavailable")
def test_opcheck_triton():
    x, g = make(CASES["groups2"])
    torch.library.opcheck(conv_weight_grad_sq_triton, (x, g, [3, 3], [2, 1], [1, 1], 2))


@pytest.mark.parametrize("x_shape,g_shape,kw,match", [
    ((2, 3, 6, 6), (2, 4, 4), {}, "must be"),
    ((2, 3, 6), (2, 4, 4, 4), {}, "must be"),
    ((2, 3, 6, 6), (3, 4, 4, 4), {}, "share B"),
    ((2, 3, 6, 6), (2, 4, 5, 4), {}, "does not match"),
    ((2, 3, 6, 6), (2, 4, 3, 3), {"stride": 2}, "does not match"),
    ((2, 3, 2, 6), (2, 4, 1, 4), {}, "does not match"),
    ((2, 3, 6, 6), (2, 4, 4, 4), {"groups": 2}, "groups"),
    ((2, 4, 6, 6), (2, 3, 4, 4), {"groups": 2}, "groups"),
    ((2, 3, 6, 6), (2, 4, 4, 4), {"stride": 0}, "stride"),
    ((2, 3, 6, 6), (2, 4, 4, 4), {"dilation": (1, -1)}, "dilation"),
])
def test_bad_shapes_raise_value_error(x_shape, g_shape, kw, match):
    with pytest.raises(ValueError, match=match):
        bk.conv_weight_grad_sq(torch.randn(x_shape), torch.randn(g_shape), 3, **kw)


def test_bad_types_raise_type_error():
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 4, 4)
    with pytest.raises(TypeError, match="floating"):
        bk.conv_weight_grad_sq(x.long(), g.long(), 3)
    with pytest.raises(TypeError, match="one dtype"):
        bk.conv_weight_grad_sq(x, g.double(), 3)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        bk.conv_weight_grad_sq(x.tolist(), g, 3)
    with pytest.raises(TypeError, match="kernel_size"):
        bk.conv_weight_grad_sq(x, g, 3.0)
    with pytest.raises(TypeError, match="kernel_size"):
        bk.conv_weight_grad_sq(x, g, (3, 3, 3))
    with pytest.raises(TypeError, match="groups"):
        bk.conv_weight_grad_sq(x, g, 3, groups=1.0)


def test_mixed_devices_and_bad_backend():
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="device"):
        bk.conv_weight_grad_sq(x, g.to("meta"), 3)
    with pytest.raises(ValueError, match="unknown backend"):
        bk.conv_weight_grad_sq(x, g, 3, backend="gpu")
    with pytest.raises(bk.BackendUnavailableError, match="CUDA tensors"):
        bk.conv_weight_grad_sq(x, g, 3, backend="cuda")


@pytest.mark.skipif(bool(testing._backend.unavailable_reason("cpu", "cpu")), reason="extension not built")
def test_compiled_op_checks_its_own_inputs():
    """The compiled op refuses what the wrapper would (it is reachable as torch.ops.bnmem.* directly)."""
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 5, 4)
    with pytest.raises(RuntimeError, match="does not match"):
        compiled_op()(x, g, [3, 3], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="groups"):
        compiled_op()(x, torch.randn(2, 4, 4, 4), [3, 3], [1, 1], [1, 1], 2)
