"""ghost_norm_linear (each backend) vs the real alternatives for per-sample weight-gradient norms of
a Linear layer: a loop of B autograd calls, and torch.func (vmap of grad) per-sample gradients.

Every alternative computes the same [B] vector from the same layer and data; the `bnmem` rows time the
kernel given the activations A and output gradients G that one ordinary backward pass already has,
the alternatives the work they need to produce per-sample norms. Groups = shapes; `bench/report.py`
turns the JSON into ratios.
"""
import pytest
import torch
from torch.func import functional_call, grad, vmap

import bnmem_kernels as bk
from bnmem_kernels import _backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, T, d_in, d_out): a plain Linear (T = 1) and a sequence layer (T = 32)
SHAPES = [(64, 1, 512, 256), (64, 32, 128, 128), (256, 1, 256, 10)]


def _problem(B, T, din, dout):
    torch.manual_seed(0)
    layer = torch.nn.Linear(din, dout, bias=False).to(DEVICE)
    x = torch.randn(B, T, din, device=DEVICE)
    target = torch.randn(B, T, dout, device=DEVICE)

    def losses_of(params, xb, tb):
        y = functional_call(layer, params, (xb,))
        return 0.5 * (y - tb).square().sum(dim=(-1, -2))

    y = layer(x)
    g = torch.autograd.grad((0.5 * (y - target).square()).sum(), y)[0]
    return layer, x, target, g, losses_of


def _sync(out):
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_{}x{}".format(*s))
@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu", "reference"])
def test_bnmem(benchmark, shape, backend):
    why = _backend.unavailable_reason(backend, DEVICE)
    if why or (backend == "triton" and DEVICE == "cpu"):
        pytest.skip(why or "the Triton interpreter is not timed")
    layer, x, target, g, _ = _problem(*shape)
    benchmark.group = "ghost_norm_linear " + "B{}_T{}_{}x{}".format(*shape)
    benchmark.extra_info.update(role="bnmem", backend=backend, shape=shape, device=DEVICE)
    benchmark(lambda: _sync(bk.ghost_norm_linear(x, g, backend=backend)))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_{}x{}".format(*s))
def test_bnmem_end_to_end(benchmark, shape):
    """Forward, one backward to the layer output, then the kernel (auto backend): the same work the
    alternatives below do, from the inputs to the [B] norms."""
    layer, x, target, g, _ = _problem(*shape)
    benchmark.group = "ghost_norm_linear " + "B{}_T{}_{}x{}".format(*shape)
    benchmark.extra_info.update(role="bnmem", backend="auto", end_to_end=True, shape=shape, device=DEVICE)

    def run():
        y = layer(x)
        gy = torch.autograd.grad((0.5 * (y - target).square()).sum(), y)[0]
        return _sync(bk.ghost_norm_linear(x, gy))

    benchmark(run)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_{}x{}".format(*s))
def test_autograd_loop(benchmark, shape):
    layer, x, target, g, losses_of = _problem(*shape)
    params = dict(layer.named_parameters())
    benchmark.group = "ghost_norm_linear " + "B{}_T{}_{}x{}".format(*shape)
    benchmark.extra_info.update(role="alternative", name="autograd loop", shape=shape, device=DEVICE)

    def run():
        losses = losses_of(params, x, target)
        return _sync(torch.stack([torch.autograd.grad(losses[i], layer.weight, retain_graph=True)[0].square().sum()
                                  for i in range(x.shape[0])]))

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_{}x{}".format(*s))
def test_torch_func_vmap(benchmark, shape):
    layer, x, target, g, losses_of = _problem(*shape)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    benchmark.group = "ghost_norm_linear " + "B{}_T{}_{}x{}".format(*shape)
    benchmark.extra_info.update(role="alternative", name="torch.func vmap(grad)", shape=shape, device=DEVICE)
    one = lambda p, xb, tb: losses_of(p, xb[None], tb[None])[0]  # noqa: E731
    per_sample = vmap(grad(one), in_dims=(None, 0, 0))

    def run():
        return _sync(per_sample(params, x, target)["weight"].square().sum(dim=(1, 2)))

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
