"""conv_weight_grad_sq (per-sample ||dW_i||^2 of a Conv2d, implicit im2col) vs the alternatives, per layer
shape, from the padded input and the output gradient that one ordinary backward already has.

Rows per group ("conv_weight_grad_sq <shape>"):
  torch wgrad (role="baseline": the unit)  torch's whole-batch weight gradient of the layer
      (aten.convolution_backward, weight only): what a plain backward pays for this layer
  bnmem <backend>        the kernel (cpu / cuda / triton where it runs; reference = F.unfold + einsum)
  unfold + ghost_norm_linear   im2col (one strided copy) + the materializing ghost norm, the
      previous route of bnmem's ConvRule for few-channel layers
  grouped wgrad          the backend's weight-gradient kernel with the batch folded into the groups
      (per-sample gradients of the layer, "expanded weights"), ConvRule's route for > 4 input channels
      per group on CPU
On CPU the file runs on ONE thread (the issue's target is stated per thread; the 2-core dev machine
is shared). The first shape is the first conv of the small CNN in test_bench_onepass.py.
"""
import pytest
import torch

import bnmem_kernels as bk
from bnmem_kernels import _backend
from bnmem_kernels.norms.rules import unfold2d

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = 20
# (B, C_in, H, W (unpadded, padding 1), C_out, kernel, stride, groups)
SHAPES = [(64, 3, 32, 32, 16, 3, 1, 1), (64, 16, 16, 16, 32, 3, 1, 1), (64, 3, 32, 32, 16, 3, 2, 1),
          (64, 32, 16, 16, 32, 3, 1, 32)]


def _id(s):
    return "B{}_{}x{}x{}_to{}_k{}s{}g{}".format(*s)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _problem(B, C, H, W, Co, k, s, gr):
    gen = torch.Generator().manual_seed(0)
    xp = torch.nn.functional.pad(torch.randn(B, C, H, W, generator=gen), (1, 1, 1, 1)).to(DEVICE)
    OH, OW = (H + 2 - k) // s + 1, (W + 2 - k) // s + 1
    g = torch.randn(B, Co, OH, OW, generator=gen).to(DEVICE)
    return xp, g


def _sync(out):
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out


def _info(benchmark, shape, role, **kw):
    benchmark.group = "conv_weight_grad_sq " + _id(shape)
    benchmark.extra_info.update(role=role, shape=list(shape), device=DEVICE, **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu", "reference"])
def test_bnmem(benchmark, shape, backend):
    _info(benchmark, shape, "bnmem", backend=backend, headline=backend in ("cpu", "cuda"))
    why = _backend.unavailable_reason(backend, DEVICE)
    if why or (backend == "triton" and DEVICE == "cpu"):
        pytest.skip(why or "the Triton interpreter is not timed")
    xp, g = _problem(*shape)
    k, s, gr = shape[5:]
    benchmark.pedantic(lambda: _sync(bk.conv_weight_grad_sq(xp, g, k, s, 1, gr, backend=backend)),
                       rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_torch_wgrad(benchmark, shape):
    _info(benchmark, shape, "baseline", name="torch whole-batch weight gradient")
    xp, g = _problem(*shape)
    B, C, H, W, Co, k, s, gr = shape
    w = torch.empty(Co, C // gr, k, k, device=DEVICE)
    benchmark.pedantic(lambda: _sync(torch.ops.aten.convolution_backward(
        g, xp, w, None, [s, s], [0, 0], [1, 1], False, [0, 0], gr, [False, True, False])[1]),
        rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_unfold_ghost_norm_linear(benchmark, shape):
    _info(benchmark, shape, "alternative", name="unfold + ghost_norm_linear (materialize)")
    xp, g = _problem(*shape)
    B, C, H, W, Co, k, s, gr = shape

    def run():
        cols = unfold2d(xp, (k, k), (1, 1), (0, 0), (s, s))                        # [B, C k k, L]
        a = cols.view(B * gr, cols.shape[1] // gr, -1).transpose(1, 2)
        rows = g.reshape(B * gr, Co // gr, -1).transpose(1, 2)
        return _sync(bk.ghost_norm_linear(a, rows, route="materialize").view(B, gr).sum(1))

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_grouped_wgrad(benchmark, shape):
    _info(benchmark, shape, "alternative", name="grouped wgrad (batch folded into groups)")
    xp, g = _problem(*shape)
    B, C, H, W, Co, k, s, gr = shape
    w = torch.empty(B * Co, C // gr, k, k, device=DEVICE)
    xf, gf = xp.reshape(1, B * C, *xp.shape[2:]), g.reshape(1, B * Co, *g.shape[2:])

    def run():
        dw = torch.ops.aten.convolution_backward(gf, xf, w, None, [s, s], [0, 0], [1, 1], False, [0, 0], B * gr,
                                                 [False, True, False])[1]
        return _sync(dw.reshape(B, -1).square().sum(1))

    benchmark.pedantic(run, rounds=3 if C // gr <= 4 and DEVICE == "cpu" else ROUNDS, warmup_rounds=1)


def test_rows_agree():
    """Untimed: every row's [B] result is the same quantity (max relative difference < 1e-4 in fp32)."""
    for shape in SHAPES:
        xp, g = _problem(*shape)
        B, C, H, W, Co, k, s, gr = shape
        ref = bk.conv_weight_grad_sq(xp.double(), g.double(), k, s, 1, gr, backend="reference")
        out = bk.conv_weight_grad_sq(xp, g, k, s, 1, gr)
        assert ((out.double() - ref).abs() / ref).max().item() < 1e-4
