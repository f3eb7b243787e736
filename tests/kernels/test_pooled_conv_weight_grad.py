"""pooled_conv_weight_grad against autograd (F.conv2d with the dense per-seed output gradient) and the
reference, every backend (Triton under the interpreter, CUDA skips without a GPU).

Errors are measured as max|out - truth| / max|truth| over the whole dW (one seed's gradient tensor is
the quantity; an entry that cancels to ~0 has no meaningful relative error of its own)."""
import pytest
import torch
import torch.nn.functional as F

import bnmem_kernels as bk
from bnmem_kernels import testing
from bnmem_kernels.ops.pooled_conv_weight_grad import compiled_op, pooled_conv_weight_grad_triton

# name -> (B, C_in, Hp, Wp, C_out, kernel_size, stride, dilation, groups, (Ho, Wo), P, N); x already padded
CASES = {
    "odd": (2, 3, 11, 9, 5, (3, 2), (2, 1), (1, 2), 1, (4, 7), 7, 3),     # Ho below the conv's 5 (a flooring pool)
    "groups2": (2, 4, 11, 9, 6, (3, 2), (2, 1), (1, 2), 2, (5, 7), 7, 2),
    "b1n1": (1, 3, 8, 8, 5, (3, 3), (1, 1), (1, 1), 1, (6, 6), 7, 1),
    "depthwise": (2, 4, 7, 8, 4, (3, 3), (1, 2), (1, 1), 4, (5, 3), 3, 5),
}
COMPILED = ("cpu", "reference")   # bigger shapes: not through the Triton interpreter
BIG = {   # the CPU kernel's chunking over (b, p) (several chunks), N and K off the register blocking
    "conv2": (4, 16, 10, 10, 32, (3, 3), (1, 1), (1, 1), 1, (8, 8), 16, 5),
    "conv1": (5, 3, 18, 18, 16, (3, 3), (1, 1), (1, 1), 1, (16, 16), 64, 6),
    "n16": (3, 16, 10, 11, 8, (3, 2), (1, 2), (2, 1), 2, (6, 5), 16, 16),   # seeds in vector lanes (N >= width)
    "n13": (2, 6, 9, 9, 6, (3, 3), (2, 1), (1, 1), 3, (4, 7), 9, 13),      # ... with a partial vector
    # ... 3 blocks of 8 seeds (the fp32 values are packed by 8 x 8 register transposes where the CPU runs
    # AVX2), runs of slots cut by the chunks of maxima (B P = 312 > one chunk of 256) and by P = 13 (not 8k)
    "n24": (24, 5, 9, 9, 4, (3, 3), (1, 1), (1, 1), 1, (7, 7), 13, 24),
}


def make(case, dtype=torch.float64, seed=0, dup=False):
    B, C, Hp, Wp, Co, ks, st, dil, gr, (Ho, Wo), P, N = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, Hp, Wp, generator=gen, dtype=torch.float64).to(dtype)
    vals = torch.randn(Co, N, B, P, generator=gen, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, 3 if dup else Ho * Wo, (B, Co, P), generator=gen)
    return x, vals, idx


def call(x, vals, idx, case, backend):
    B, C, Hp, Wp, Co, ks, st, dil, gr, osz, P, N = case
    return bk.pooled_conv_weight_grad(x, vals, idx, osz, ks, st, dil, gr, backend=backend)


def autograd_truth(x, vals, idx, case):
    """dW per seed by autograd in fp64: the dense output gradient of seed n (vals put at idx, duplicates
    accumulated) pulled back through F.conv2d of the cropped input to its weight."""
    B, C, Hp, Wp, Co, ks, st, dil, gr, (Ho, Wo), P, N = case
    hu, wu = (Ho - 1) * st[0] + dil[0] * (ks[0] - 1) + 1, (Wo - 1) * st[1] + dil[1] * (ks[1] - 1) + 1
    xc = x[:, :, :hu, :wu].double()
    w = torch.zeros(Co, C // gr, *ks, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(xc, w, stride=st, dilation=dil, groups=gr)
    assert y.shape[2:] == (Ho, Wo)
    bi = torch.arange(B).view(B, 1, 1).expand(B, Co, P)
    oi = torch.arange(Co).view(1, Co, 1).expand(B, Co, P)
    out = []
    for n in range(N):
        g = torch.zeros(B, Co, Ho * Wo, dtype=torch.float64)
        g.index_put_((bi, oi, idx), vals[:, n].double().permute(1, 0, 2), accumulate=True)
        out.append(torch.autograd.grad(y, w, g.view(B, Co, Ho, Wo), retain_graph=True)[0])
    return torch.stack(out)


def rel(out, truth):
    o, t = out.detach().double().cpu(), truth.detach().double().cpu()
    return ((o - t).abs().max() / t.abs().max()).item()


@pytest.mark.parametrize("device,backend", testing.device_backend_params())
@pytest.mark.parametrize("name", list(CASES))
def test_fp64_matches_autograd(device, backend, name):
    case = CASES[name]
    x, vals, idx = make(case)
    out = call(x.to(device), vals.to(device), idx.to(device), case, backend)
    B, C, Hp, Wp, Co, ks, st, dil, gr, osz, P, N = case
    assert out.shape == (N, Co, C // gr, *ks) and out.dtype == torch.float64 and out.device.type == device
    assert rel(out, autograd_truth(x, vals, idx, case)) <= testing.RTOL[torch.float64]


@pytest.mark.parametrize("device,backend", testing.device_backend_params())
@pytest.mark.parametrize("name", ["odd", "groups2"])
def test_fp32_matches_fp64_autograd(device, backend, name):
    case = CASES[name]
    x, vals, idx = make(case, torch.float32, seed=1)
    out = call(x.to(device), vals.to(device), idx.to(device), case, backend)
    assert out.dtype == torch.float32
    assert rel(out, autograd_truth(x, vals, idx, case)) <= testing.RTOL[torch.float32]


@pytest.mark.parametrize("device,backend", testing.device_backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs(device, backend, dtype):
    """fp16/bf16: products and sums in fp32, the result rounded to the input dtype, so the error against
    fp64 autograd on the same rounded inputs is the output rounding (bf16 2e-2, fp16 5e-3 stated)."""
    case = CASES["groups2"]
    x, vals, idx = make(case, dtype, seed=2)
    out = call(x.to(device), vals.to(device), idx.to(device), case, backend)
    assert out.dtype == dtype
    assert rel(out, autograd_truth(x, vals, idx, case)) <= testing.RTOL[dtype]


@pytest.mark.parametrize("device,backend", testing.device_backend_params())
def test_duplicate_indices_add(device, backend):
    case = CASES["odd"]
    x, vals, idx = make(case, seed=3, dup=True)
    idx[0, 1, :] = 2                                      # one (b, o) row: every slot the same maximum
    assert (idx[:, :, :, None] == idx[:, :, None, :]).sum() > idx.numel()
    out = call(x.to(device), vals.to(device), idx.to(device), case, backend)
    assert rel(out, autograd_truth(x, vals, idx, case)) <= testing.RTOL[torch.float64]


@pytest.mark.parametrize("device,backend", testing.device_backend_params())
@pytest.mark.parametrize("name", ["odd", "groups2", pytest.param("n13", marks=pytest.mark.skipif(
    bool(testing._backend.unavailable_reason("cpu", "cpu")), reason="compiled only"))])
def test_non_contiguous_inputs(device, backend, name):
    case = {**CASES, **BIG}[name]
    x, vals, idx = make(case, seed=4)
    xs = F.pad(x, (2, 0, 1, 0))[:, :, 1:, 2:]                               # a sliced view of a bigger tensor
    vs = torch.stack([vals, torch.zeros_like(vals)], dim=1)[:, 0]            # [C_out, N, B, P] view, strided
    vs = vs.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)             # and P not the fastest dim
    ix = idx.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xs.is_contiguous() and not vs.is_contiguous() and not ix.is_contiguous()
    out = call(xs.to(device), vs.to(device), ix.to(device), case, backend)
    assert rel(out, autograd_truth(x, vals, idx, case)) <= testing.RTOL[torch.float64]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(BIG))
def test_bench_like_shapes(backend, dtype, name):
    case = BIG[name]
    x, vals, idx = make(case, dtype, seed=5)
    out = call(x, vals, idx, case, backend)
    assert rel(out, autograd_truth(x, vals, idx, case)) <= testing.RTOL[dtype]


@pytest.mark.skipif(bool(testing._backend.unavailable_reason("cpu", "cpu")), reason="extension not built")
@pytest.mark.parametrize("name", ["odd", "groups2", "conv2", "n16", "n13", "n24"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cpu_baseline_isa(monkeypatch, name, dtype):
    """The CPU kernel's SSE2 build (the run-time pick on CPUs without AVX2/FMA), forced."""
    monkeypatch.setenv("BNMEM_CPU_ISA", "baseline")
    case = {**CASES, **BIG}[name]
    x, vals, idx = make(case, dtype, seed=6)
    assert rel(call(x, vals, idx, case, "cpu"), autograd_truth(x, vals, idx, case)) <= testing.RTOL[dtype]


def test_conv_then_max_pool_end_to_end():
    """A real padded nn.Conv2d followed by max_pool2d: the seeds' weight gradients through the pool (autograd)
    are the op's on the pool's maxima (max_pool2d's indices are flat positions in the conv output)."""
    torch.manual_seed(7)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1, groups=1).double()
    x = torch.randn(3, 3, 9, 8, dtype=torch.float64)
    y = conv(x)                                                    # [3, 6, 9, 8]
    pooled, ind = F.max_pool2d(y, 2, return_indices=True)           # [3, 6, 4, 4]: floors the odd row
    N = 4
    c = torch.randn(N, *pooled.shape, dtype=torch.float64)
    truth = torch.stack([torch.autograd.grad((c[n] * F.max_pool2d(conv(x), 2)).sum(), conv.weight)[0]
                         for n in range(N)])
    B, Co = pooled.shape[:2]
    vals = c.reshape(N, B, Co, -1).permute(2, 0, 1, 3)             # [C_out, N, B, P]
    idx = ind.reshape(B, Co, -1)
    xp = F.pad(x, (1, 1, 1, 1))
    for backend in COMPILED:
        out = bk.pooled_conv_weight_grad(xp, vals, idx, y.shape[2:], 3, backend=backend)
        assert rel(out, truth) <= testing.RTOL[torch.float64]


def test_reference_is_autograd():
    for name in ("groups2", "depthwise"):
        x, vals, idx = make(CASES[name], seed=8, dup=True)
        assert rel(call(x, vals, idx, CASES[name], "reference"), autograd_truth(x, vals, idx, CASES[name])) < 1e-12


@pytest.mark.parametrize("device,backend", testing.device_backend_params())
def test_empty_dims(device, backend):
    x = torch.randn(2, 3, 6, 6, device=device)
    out = bk.pooled_conv_weight_grad(x, torch.randn(4, 2, 2, 0, device=device),
                                     torch.zeros(2, 4, 0, dtype=torch.long, device=device), 4, 3, backend=backend)
    assert out.shape == (2, 4, 3, 3, 3) and not out.any()
    out = bk.pooled_conv_weight_grad(x, torch.randn(4, 0, 2, 3, device=device),
                                     torch.zeros(2, 4, 3, dtype=torch.long, device=device), 4, 3, backend=backend)
    assert out.shape == (0, 4, 3, 3, 3)


@pytest.mark.skipif(bool(testing._backend.unavailable_reason("cpu", "cpu")), reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck_compiled(dtype):
    x, vals, idx = make(CASES["groups2"], dtype)
    torch.library.opcheck(compiled_op(), (x, vals, idx, [5, 7], [3, 2], [2, 1], [1, 2], 2))


@pytest.mark.skipif(bool(testing._backend.unavailable_reason("triton", "cpu")), reason="triton unavailable")
def test_opcheck_triton():
    x, vals, idx = make(CASES["b1n1"])
    torch.library.opcheck(pooled_conv_weight_grad_triton, (x, vals, idx, [6, 6], [3, 3], [1, 1], [1, 1], 1))


def _args():
    return torch.randn(2, 4, 6, 6), torch.randn(6, 3, 2, 5), torch.randint(0, 16, (2, 6, 5))


@pytest.mark.parametrize("change,match", [
    (lambda a: (a[0][0], a[1], a[2], 4, 3), "x_pad must be"),
    (lambda a: (a[0], a[1][0], a[2], 4, 3), "vals must be"),
    (lambda a: (a[0], a[1], a[2][0], 4, 3), "idx must be"),
    (lambda a: (a[0], a[1][:, :, :1], a[2], 4, 3), "vals must be"),
    (lambda a: (a[0], a[1], a[2][:, :5], 4, 3), "idx must be"),
    (lambda a: (a[0], a[1], a[2][:, :, :4], 4, 3), "idx must be"),
    (lambda a: (a[0], a[1], a[2], 5, 3), "out_size"),
    (lambda a: (a[0], a[1], a[2], (4, 5), 3), "out_size"),
    (lambda a: (a[0], a[1], a[2], 0, 3), "out_size"),
    (lambda a: (a[0], a[1], a[2], 4, 7), "out_size"),
    (lambda a: (a[0], a[1], a[2] + 1, 4, 3), "idx entries"),
    (lambda a: (a[0], a[1], a[2] - 16, 4, 3), "idx entries"),
    (lambda a: (a[0], a[1], a[2], 4, 3, 1, 1, 3), "groups"),
    (lambda a: (a[0][:, :3], a[1], a[2], 4, 3, 1, 1, 2), "groups"),
    (lambda a: (a[0], a[1], a[2], 4, 3, 0), "stride"),
    (lambda a: (a[0], a[1], a[2], 4, 3, 1, (1, -1)), "dilation"),
])
def test_bad_input_raises_value_error(change, match):
    a = list(_args())
    a[2][0, 0, 0], a[2][0, 0, 1] = 15, 0              # both ends of [0, Ho*Wo) present
    with pytest.raises(ValueError, match=match):
        bk.pooled_conv_weight_grad(*change(a))


def test_bad_types_raise_type_error():
    x, vals, idx = _args()
    with pytest.raises(TypeError, match="x_pad must be a floating"):
        bk.pooled_conv_weight_grad(x.long(), vals, idx, 4, 3)
    with pytest.raises(TypeError, match="one dtype"):
        bk.pooled_conv_weight_grad(x, vals.double(), idx, 4, 3)
    with pytest.raises(TypeError, match="idx must be an int64"):
        bk.pooled_conv_weight_grad(x, vals, idx.int(), 4, 3)
    with pytest.raises(TypeError, match="idx must be a torch.Tensor"):
        bk.pooled_conv_weight_grad(x, vals, idx.tolist(), 4, 3)
    with pytest.raises(TypeError, match="kernel_size"):
        bk.pooled_conv_weight_grad(x, vals, idx, 4, 3.0)
    with pytest.raises(TypeError, match="out_size"):
        bk.pooled_conv_weight_grad(x, vals, idx, (4, 4, 4), 3)
    with pytest.raises(TypeError, match="groups"):
        bk.pooled_conv_weight_grad(x, vals, idx, 4, 3, groups=1.0)


def test_mixed_devices_and_bad_backend():
    x, vals, idx = _args()
    with pytest.raises(ValueError, match="device"):
        bk.pooled_conv_weight_grad(x, vals.to("meta"), idx, 4, 3)
    with pytest.raises(ValueError, match="device"):
        bk.pooled_conv_weight_grad(x, vals, idx.to("meta"), 4, 3)
    with pytest.raises(ValueError, match="unknown backend"):
        bk.pooled_conv_weight_grad(x, vals, idx, 4, 3, backend="gpu")
    with pytest.raises(bk.BackendUnavailableError, match="CUDA tensors"):
        bk.pooled_conv_weight_grad(x, vals, idx, 4, 3, backend="cuda")


@pytest.mark.skipif(bool(testing._backend.unavailable_reason("cpu", "cpu")), reason="extension not built")
def test_compiled_op_checks_its_own_inputs():
    """The compiled op refuses what the wrapper would (it is reachable as torch.ops.bnmem.* directly)."""
    x, vals, idx = _args()
    idx = idx.clamp(max=15)
    with pytest.raises(RuntimeError, match="idx entries"):
        compiled_op()(x, vals, idx + 1, [4, 4], [3, 3], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="out_size"):
        compiled_op()(x, vals, idx, [5, 4], [3, 3], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="groups"):
        compiled_op()(x, vals, idx, [4, 4], [3, 3], [1, 1], [1, 1], 4)
    with pytest.raises(RuntimeError, match="int64"):
        compiled_op()(x, vals, idx.int(), [4, 4], [3, 3], [1, 1], [1, 1], 1)
