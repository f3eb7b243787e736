"""pooled_conv_weight_grad (the Conv2d weight gradient of N seeds whose output gradients sit on max-pool
maxima) vs the alternatives, on the two convs of the small CNN (B = 64, N = 16 seeds).

Rows per group ("pooled_conv_weight_grad <shape> t<threads>"):
  bnmem <backend>     the kernel (cpu; cuda where it runs; reference = scatter + F.unfold + einsum)
  gather + bmm        (role="baseline": the unit) the PyTorch route it replaces: the unfolded input's
      rows at the maxima gathered by index_select into [C_out, B P, C_in/g kh kw] (a 19 MB / 7 MB copy
      on these shapes), then one bmm with vals [C_out, N, B P]
  dense + conv2d_weight   vals scattered into the full-resolution output gradient, then
      torch.nn.grad.conv2d_weight once per seed
Each row runs at 1 and at 2 intra-op threads (the 2-core dev machine is shared: 2-thread numbers are noisy).
"""
import pytest
import torch
import torch.nn.functional as F

import bnmem_kernels as bk
from bnmem_kernels import _backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = 10
N = 16
# name -> (B, C_in, Hp, Wp, C_out, k, (Ho, Wo), pool)
SHAPES = {"conv2": (64, 16, 10, 10, 32, 3, (8, 8), 2), "conv1": (64, 3, 18, 18, 16, 3, (16, 16), 2)}
THREADS = [1, 2]


@pytest.fixture(params=THREADS, ids=lambda t: f"t{t}")
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def _problem(name):
    B, C, Hp, Wp, Co, k, (Ho, Wo), pool = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, Hp - 2, Wp - 2, generator=gen)
    xp = F.pad(x, (1, 1, 1, 1))
    w = torch.randn(Co, C, k, k, generator=gen)
    _, ind = F.max_pool2d(F.conv2d(xp, w), pool, return_indices=True)     # the real maxima
    idx = ind.reshape(B, Co, -1)
    vals = torch.randn(Co, N, B, idx.shape[2], generator=gen)
    return xp.to(DEVICE), vals.to(DEVICE), idx.to(DEVICE), (Ho, Wo), k


def _sync(out):
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out


def _info(benchmark, shape, threads, role, **kw):
    benchmark.group = f"pooled_conv_weight_grad {shape} t{threads}"
    benchmark.extra_info.update(role=role, shape=shape, threads=threads, device=DEVICE, **kw)


def gather_bmm(xp, vals, idx, osz, k):
    """The route being replaced: unfolded rows at the maxima (index_select), then a bmm."""
    B, C = xp.shape[:2]
    Co, n, _, P = vals.shape
    cols = F.unfold(xp, k).transpose(1, 2)                                  # [B, L, C k k] (a view)
    L = cols.shape[1]
    flat = (torch.arange(B, device=xp.device).view(B, 1, 1) * L + idx).permute(1, 0, 2).reshape(-1)
    rows = cols.reshape(B * L, -1).index_select(0, flat).view(Co, B * P, -1)  # the gathered copy
    return torch.bmm(vals.reshape(Co, n, B * P), rows).transpose(0, 1).reshape(n, Co, C, k, k)


def dense_conv2d_weight(xp, vals, idx, osz, k):
    """vals scattered to full resolution, then torch's weight gradient once per seed."""
    B, C = xp.shape[:2]
    Co, n, _, P = vals.shape
    dense = torch.zeros(n, B, Co, osz[0] * osz[1], device=xp.device, dtype=xp.dtype)
    dense.scatter_add_(3, idx.unsqueeze(0).expand(n, B, Co, P), vals.permute(1, 2, 0, 3))
    dense = dense.view(n, B, Co, *osz)
    return torch.stack([torch.nn.grad.conv2d_weight(xp, (Co, C, k, k), dense[s]) for s in range(n)])


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("backend", ["cuda", "cpu", "reference"])
def test_bnmem(benchmark, threads, name, backend):
    _info(benchmark, name, threads, "bnmem", backend=backend, headline=backend in ("cpu", "cuda"))
    why = _backend.unavailable_reason(backend, DEVICE)
    if why:
        pytest.skip(why)
    xp, vals, idx, osz, k = _problem(name)
    benchmark.pedantic(lambda: _sync(bk.pooled_conv_weight_grad(xp, vals, idx, osz, k, backend=backend)),
                       rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.parametrize("name", list(SHAPES))
def test_gather_bmm(benchmark, threads, name):
    _info(benchmark, name, threads, "baseline", name="unfold + index_select + bmm")
    xp, vals, idx, osz, k = _problem(name)
    benchmark.pedantic(lambda: _sync(gather_bmm(xp, vals, idx, osz, k)), rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.parametrize("name", list(SHAPES))
def test_dense_conv2d_weight(benchmark, threads, name):
    _info(benchmark, name, threads, "alternative", name="scatter to full resolution + conv2d_weight per seed")
    xp, vals, idx, osz, k = _problem(name)
    benchmark.pedantic(lambda: _sync(dense_conv2d_weight(xp, vals, idx, osz, k)), rounds=3, warmup_rounds=1)


def test_rows_agree():
    """Untimed: every row computes the same dW (max error / max |dW| < 1e-5 in fp32)."""
    for name in SHAPES:
        xp, vals, idx, osz, k = _problem(name)
        ref = bk.pooled_conv_weight_grad(xp.double(), vals.double(), idx, osz, k, backend="reference")
        for out in (bk.pooled_conv_weight_grad(xp, vals, idx, osz, k), gather_bmm(xp, vals, idx, osz, k),
                    dense_conv2d_weight(xp, vals, idx, osz, k)):
            assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
