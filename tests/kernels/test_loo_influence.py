"""loo_influence (bnmem_kernels/influence.py) against the reduced-batch loop (reference/loo_influence.py):
the exact engine's test zoos and the suite's models in fp64 (1e-10), every route, odd B, B = 2, chunks,
per-layer sums, dropout's one-mask-per-sample semantics, the closed form without batch coupling, the
model left as it was, and bad input."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnmem_kernels as bk
from bnmem.models import build_model
from bnmem.resnet import build_resnet
from bnmem_kernels.influence import loo_report
from bnmem_kernels.reference import loo_influence as reference
from test_exact import ce, data, make as make_exact, rel
from test_exact_chain import make as make_chain

EXACT_ZOO = ["cnn", "mlp_bn1d", "resnet_basic", "resnet_bottleneck", "mixed", "dropout", "coupled_custom"]
CHAIN_ZOO = ["vgg", "conv_geom", "groups_top", "post_act", "overlap_nested", "pool_no_bn", "adaptive_max",
             "pool_groups", "pool_opts", "frozen", "mlp", "inplace", "bn1d_3d", "bn1d_3d_adaptive"]


def suite(arch, norm, dtype=torch.float64):
    torch.manual_seed(0)
    if arch == "resnet8":
        return build_resnet("resnet8", norm, 1, 3, 4).to(dtype), (1, 6, 6), 3
    return build_model(arch, norm, (1, 8), 3, 4).to(dtype), (1, 8, 8), 3


def model(zoo, arch, dtype=torch.float64):
    if zoo == "exact":
        return make_exact(arch, dtype)
    if zoo == "chain":
        return make_chain(arch, dtype)
    return suite(arch, zoo, dtype)


ALL = ([("exact", a) for a in EXACT_ZOO] + [("chain", a) for a in CHAIN_ZOO]
       + [("bn", "cnn"), ("bn", "mlp"), ("bn", "resnet8")])


def check(got, exp, tol=1e-10):
    """total: relative error; per layer: error relative to the largest total (a bias right before a
    BatchNorm has influence 0 up to rounding in both)."""
    (out, pl), (e, epl) = got, exp
    assert out.dtype == e.dtype and out.shape == e.shape
    assert rel(out, e) <= tol, rel(out, e)
    assert list(pl) == list(epl)
    scale = e.abs().max().item()
    for n in epl:
        assert (pl[n].double() - epl[n].double()).abs().max().item() <= tol * scale, n


def both(m, x, y, seed=7, **kw):
    torch.manual_seed(seed)
    exp = reference(m, ce, x, y, per_layer=True)
    torch.manual_seed(seed)
    got, rep = loo_report(m, ce, x, y, per_layer=True, **kw)
    return got, exp, rep


@pytest.mark.parametrize("zoo,arch", ALL, ids=[f"{z}-{a}" for z, a in ALL])
def test_fp64_matches_loop(zoo, arch):
    m, shape, k = model(zoo, arch)
    x, y = data(shape, 5, k)
    got, exp, rep = both(m, x, y, max_chunk=2)
    check(got, exp)
    assert rep["route"] in ("stacked", "vmap")
    if zoo != "exact" or arch != "coupled_custom":
        assert rep["route"] == "stacked", rep       # every zoo model but the custom coupling one


@pytest.mark.parametrize("route", ["stacked", "vmap", "loop"])
@pytest.mark.parametrize("zoo,arch", [("exact", "resnet_basic"), ("exact", "dropout"), ("chain", "conv_geom"),
                                      ("chain", "bn1d_3d"), ("bn", "resnet8")])
def test_every_route_matches_loop(route, zoo, arch):
    m, shape, k = model(zoo, arch)
    x, y = data(shape, 4, k)
    got, exp, rep = both(m, x, y, route=route, max_chunk=3)
    assert rep["route"] == route
    check(got, exp)


@pytest.mark.parametrize("B", [2, 3, 8])
@pytest.mark.parametrize("zoo,arch", [("chain", "vgg"), ("exact", "resnet_basic"), ("bn", "cnn")])
def test_batch_sizes(zoo, arch, B):
    m, shape, k = model(zoo, arch)
    x, y = data(shape, B, k)
    got, exp, _ = both(m, x, y)
    check(got, exp)


def test_b2_bn1d_raises_like_the_loop():
    """A reduced batch of one sample has one value per channel at a BatchNorm1d: both refuse."""
    m, shape, k = make_exact("mlp_bn1d")
    x, y = data(shape, 2, k)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        reference(m, ce, x, y)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bk.loo_influence(m, ce, x, y)


def test_b1_raises():
    m, shape, k = make_chain("vgg")
    x, y = data(shape, 1, k)
    for fn in (reference, bk.loo_influence):
        with pytest.raises(ValueError, match="B >= 2"):
            fn(m, ce, x, y)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunks_give_the_same_numbers(chunk):
    m, shape, k = make_chain("post_act")
    x, y = data(shape, 7, k)
    exp = reference(m, ce, x, y, per_layer=True)
    for route in ("stacked", "vmap"):
        got, rep = loo_report(m, ce, x, y, per_layer=True, max_chunk=chunk, route=route)
        check(got, exp)
        if route == "stacked":
            assert rep["groups_per_pass"] == chunk


def test_default_chunk_from_budget(monkeypatch):
    m, shape, k = make_chain("vgg")
    x, y = data(shape, 5, k)
    exp = reference(m, ce, x, y, per_layer=True)
    monkeypatch.setenv("BNMEM_LOO_BUDGET_MB", "0")          # one group per pass
    got, rep = loo_report(m, ce, x, y, per_layer=True)
    assert rep["groups_per_pass"] == 1
    check(got, exp)
    monkeypatch.setenv("BNMEM_LOO_BUDGET_MB", "4096")
    got, rep = loo_report(m, ce, x, y, per_layer=True)
    assert rep["groups_per_pass"] == 5
    check(got, exp)


def test_per_layer_squares_sum_to_total():
    m, shape, k = make_exact("mixed")
    x, y = data(shape, 6, k)
    out, pl = bk.loo_influence(m, ce, x, y, per_layer=True)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert list(pl) == names                         # frozen parameters are left out, model order
    torch.testing.assert_close(torch.stack([v.square() for v in pl.values()]).sum(0).sqrt(), out, rtol=1e-12, atol=0)
    torch.testing.assert_close(bk.loo_influence(m, ce, x, y), out, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------ dropout semantics

@pytest.mark.parametrize("route", ["auto", "vmap", "loop"])
def test_dropout_keeps_one_mask_per_sample(route):
    """Against a hand-built loop: the masks drawn once on the full batch (the same RNG draws as the call
    makes), each reduced batch multiplying by the rows of its samples."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.4), nn.Linear(6, 3)).double()
    B = 6
    x, y = data((5,), B, 3)
    torch.manual_seed(11)
    mask = F.dropout(torch.ones(B, 6, dtype=torch.float64), 0.4, True)
    after_draw = torch.rand(3)

    def loss(keep):
        h = m[2](m[1](m[0](x[keep]))) * mask[keep]
        return ce(m[4](h), y[keep]).mean()

    params = list(m.parameters())
    full = torch.autograd.grad(loss(torch.arange(B)), params)
    exp = []
    for i in range(B):
        keep = torch.tensor([k for k in range(B) if k != i])
        gi = torch.autograd.grad(loss(keep), params)
        exp.append(sum((a - b).square().sum() for a, b in zip(full, gi)).sqrt())
    exp = torch.stack(exp)
    torch.manual_seed(11)
    got, rep = loo_report(m, ce, x, y, route=route)
    assert rel(got, exp) <= 1e-10, (rep, rel(got, exp))
    # the RNG state is put back: the next draws are those of the fresh seed, not those after the mask
    torch.manual_seed(11)
    fresh = torch.rand(3)
    torch.manual_seed(11)
    bk.loo_influence(m, ce, x, y)
    assert torch.equal(torch.rand(3), fresh) and not torch.equal(fresh, after_draw)


def test_dropout2d_and_alpha_dropout_match_the_loop():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout2d(0.3), nn.Conv2d(4, 4, 3),
                      nn.BatchNorm2d(4), nn.SELU(), nn.Flatten(), nn.AlphaDropout(0.2), nn.Linear(16, 3)).double()
    x, y = data((2, 6, 6), 5, 3)
    for route in ("stacked", "vmap", "loop"):
        got, exp, _ = both(m, x, y, route=route)
        check(got, exp)


def test_other_random_ops_are_refused():
    class Noisy(nn.Module):
        def forward(self, x):
            return x + 0.1 * torch.randn_like(x)

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), Noisy(), nn.Linear(5, 3)).double()
    x, y = data((4,), 5, 3)
    with pytest.raises(ValueError, match="random numbers"):
        reference(m, ce, x, y)
    with pytest.raises(ValueError, match="random numbers"):
        bk.loo_influence(m, ce, x, y)


# ------------------------------------------------------------------------------------ closed form

CLOSED = [(a, n) for a in ("cnn", "mlp") for n in ("gn", "ln", "none", "bn-eval")] + [("resnet8", "gn")]


@pytest.mark.parametrize("arch,norm", CLOSED, ids=[f"{a}-{n}" for a, n in CLOSED])
def test_closed_form_without_coupling_equals_the_loop(arch, norm):
    m, shape, k = suite(arch, norm.replace("-eval", ""))
    if norm == "bn-eval":
        with torch.no_grad():
            m.train()(torch.randn(16, *shape, dtype=torch.float64))   # non-trivial running statistics
        m.eval()
    x, y = data(shape, 7, k)
    got, exp, rep = both(m, x, y)
    assert rep["route"] == "closed_form", rep
    check(got, exp)


def test_closed_form_formula():
    """Without coupling infl_i = ||g_i - gbar|| / (B - 1), g_i from the exact per-sample engine."""
    m, shape, k = suite("cnn", "gn")
    x, y = data(shape, 6, k)
    params = [p for p in m.parameters()]
    g = [torch.cat([t.flatten() for t in torch.autograd.grad(ce(m(x[i:i + 1]), y[i:i + 1]).sum(), params)])
         for i in range(6)]
    g = torch.stack(g)
    exp = (g - g.mean(0)).norm(dim=1) / 5
    assert rel(bk.loo_influence(m, ce, x, y), exp) <= 1e-10


def test_coupling_outside_batchnorm_is_detected():
    """A parameter-free module centering over the batch: the closed form and the stacked pass would be
    wrong; their checks refuse them and vmap (per reduced batch) gives the loop's numbers."""
    class Center(nn.Module):
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    torch.manual_seed(0)
    for norm in (nn.GroupNorm(2, 4), nn.BatchNorm2d(4)):
        m = nn.Sequential(nn.Conv2d(2, 4, 3), norm, nn.Tanh(), Center(), nn.Flatten(), nn.Linear(64, 3)).double()
        x, y = data((2, 6, 6), 5, 3)
        got, exp, rep = both(m, x, y)
        check(got, exp)
        assert rep["route"] == "vmap" and "stacked" in rep["refused"], rep
        if isinstance(norm, nn.GroupNorm):
            assert "coupled" in rep["refused"]["closed_form"]


# ------------------------------------------------------------------------------------ fp32

@pytest.mark.parametrize("zoo,arch", [("chain", "vgg"), ("bn", "cnn"), ("gn", "cnn"), ("exact", "resnet_basic")])
def test_fp32_vs_fp64_loop(zoo, arch):
    """fp32 against the fp64 loop on the same (fp32-rounded) values. Stated tolerance 1e-4 relative: the
    influence is a difference of two gradients that agree to ~1/B, so fp32 rounding of each is
    amplified by up to ~B."""
    m32, shape, k = model(zoo, arch, torch.float32)
    m64 = model(zoo, arch, torch.float32)[0].double()
    x, y = data(shape, 6, k, torch.float32)
    exp = reference(m64, ce, x.double(), y)
    out = bk.loo_influence(m32, ce, x, y)
    assert out.dtype == torch.float32
    assert rel(out, exp) <= 1e-4, rel(out, exp)


# ------------------------------------------------------------------------------------ model unchanged

@pytest.mark.parametrize("route", ["auto", "stacked", "vmap", "loop"])
def test_model_left_exactly_as_it_was(route):
    m, shape, k = make_chain("mlp")          # dropout, BN1d with and without running stats
    m.train()
    m[4].eval()                               # mixed flags
    m[1].momentum = None                      # cumulative average: num_batches_tracked matters
    for p in list(m.parameters())[::2]:
        p.grad = torch.full_like(p, 0.25)
    grads = [p.grad for p in m.parameters()]
    params = [p.detach().clone() for p in m.parameters()]
    sd = {kk: v.clone() for kk, v in m.state_dict().items()}
    flags = [mm.training for mm in m.modules()]
    hooks = [(dict(mm._forward_hooks), dict(mm._forward_pre_hooks), dict(mm._backward_hooks)) for mm in m.modules()]
    x, y = data(shape, 5, k)
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    loo_report(m, ce, x, y, route=route)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [mm.training for mm in m.modules()] == flags
    for kk, v in m.state_dict().items():
        assert torch.equal(v, sd[kk]), kk
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), params))
    assert all(p.grad is g for p, g in zip(m.parameters(), grads))
    assert all(g is None or torch.equal(g, torch.full_like(g, 0.25)) for g in grads)
    assert hooks == [(dict(mm._forward_hooks), dict(mm._forward_pre_hooks), dict(mm._backward_hooks))
                     for mm in m.modules()]


# ------------------------------------------------------------------------------------ bad input

def test_bad_input_errors():
    m, shape, k = make_chain("vgg")
    x, y = data(shape, 4, k)
    with pytest.raises(ValueError, match="reduction"):
        bk.loo_influence(m, lambda o, t: F.cross_entropy(o, t), x, y)
    with pytest.raises(ValueError, match=r"per-sample losses of shape \[4\]"):
        bk.loo_influence(m, lambda o, t: F.cross_entropy(o, t, reduction="none")[:3], x, y)
    with pytest.raises(TypeError, match="targets"):
        bk.loo_influence(m, ce, x, y.tolist())
    with pytest.raises(ValueError, match="targets must have the batch size"):
        bk.loo_influence(m, ce, x, y[:3])
    with pytest.raises(ValueError, match="every input must have the batch size|batch size"):
        bk.loo_influence(m, ce, (x, x[:3]), y)
    with pytest.raises(ValueError, match="max_chunk must be >= 1"):
        bk.loo_influence(m, ce, x, y, max_chunk=0)
    with pytest.raises(ValueError, match="route must be"):
        loo_report(m, ce, x, y, route="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        bk.loo_influence(m, ce, x, y, backend="tpu")
    with pytest.raises(ValueError, match="closed_form.*does not apply"):
        loo_report(m, ce, x, y, route="closed_form")          # train-mode BatchNorm: coupled
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bk.loo_influence(lambda t: t, ce, x, y)
    with pytest.raises(ValueError, match="NaN"):
        bk.loo_influence(m, ce, x.clone().fill_(float("nan")), y)


def test_report_names_the_route():
    m, shape, k = suite("cnn", "bn")
    x, y = data(shape, 4, k)
    assert loo_report(m, ce, x, y)[1]["route"] == "stacked"
    m, shape, k = make_exact("coupled_custom")
    x, y = data(shape, 4, k)
    rep = loo_report(m, ce, x, y)[1]
    assert rep["route"] == "vmap" and "BatchCentering" in rep["refused"]["stacked"]
