"""mode="exact", path "chain" (norms/exact_chain.py) against the autograd loop
(reference.per_sample_grad_norms(mode="exact")): a zoo of nn.Sequential models exercising every form of the
hand-written backward (dense / pooled / affine, affine-only input gradient, groups, 1-d/2-d BatchNorm), refusals and
their fallbacks under path="auto", chunking, the workspace pool, and the model left as it was."""
import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnmem_kernels.norms._checks import trainable_parameters
from bnmem_kernels.norms.exact import ExactFallbackWarning, exact_report
from bnmem_kernels.norms.exact_chain import ChainUnsupported, release_workspaces
from bnmem_kernels.reference import per_sample_grad_norms as reference
from _helpers import ce, data, rel        # the same loss, data and error measure as the other exact tests


def check_per_layer(pl, expected_pl, total_scale, tol):
    """Per parameter: relative error, or (for entries that are zero up to rounding, e.g. a bias right
    before a BN) an absolute error relative to the total norm (the same floor as test_exact.py)."""
    assert list(pl) == list(expected_pl)
    for n, v in expected_pl.items():
        err = ((pl[n].double() - v.double()).abs() / (v.double().abs() + 1e-4 * total_scale)).max().item()
        assert err <= tol, (n, err)


def _randomize_bn(m, seed):
    """Non-trivial BN affine parameters (default 1/0 would hide gamma/beta mistakes)."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for mm in m.modules():
            if isinstance(mm, nn.modules.batchnorm._BatchNorm) and mm.weight is not None:
                mm.weight.copy_(0.5 + torch.rand(mm.weight.shape, generator=g))
                mm.bias.copy_(0.3 * torch.randn(mm.bias.shape, generator=g))


def make(arch, dtype=torch.float64, seed=0):
    """(model, input shape without B, number of classes). Backward forms noted per model."""
    torch.manual_seed(seed)
    k = 3
    if arch == "vgg":
        # top BN -> affine only -> conv3 input gradient by stacked kernels; maxpool2 under conv3: pooled;
        # ReLU keeps pooled; BN2 sums of pooled -> pooled + affine at conv2 (weight grads of both forms)
        m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(5, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, k))
        shape = (2, 8, 8)
    elif arch == "conv_geom":
        # stride 2 / padding / no bias; dilation + groups=2 + bias under a non-top BN (dense + affine,
        # materialized for groups > 1); rectangular kernel/stride/padding under the top BN
        m = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=True), nn.BatchNorm2d(4), nn.ELU(),
                          nn.Conv2d(4, 6, (2, 3), stride=(1, 2), padding=(1, 0), bias=True), nn.BatchNorm2d(6),
                          nn.Softplus(), nn.Flatten(), nn.Linear(6 * 6 * 2, k))
        shape = (2, 9, 9)
    elif arch == "groups_top":
        # groups=2 conv right under the top BN (affine only, groups > 1: materialized), affine=False top BN
        m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(6, affine=False),
                          nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * 3 * 3, k))
        shape = (2, 6, 6)
    elif arch == "post_act":
        # Conv->ReLU->BN (affine materialized at a ReLU); overlapping max pool above a BN (affine:
        # materialized, not pooled); BN directly after a max pool; ceil_mode max pool under a 1x1 conv
        # (pooled) under the top BN (affine only: stacked-kernel input gradient)
        m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, k))
        shape = (2, 8, 8)
    elif arch == "overlap_nested":
        # overlapping max pool (3, stride 2, padding 1) under a conv: pooled form with repeated maxima;
        # AvgPool2d; a nested nn.Sequential
        m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
                          nn.AvgPool2d(2),
                          nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), nn.ReLU()),
                          nn.Flatten(), nn.Linear(16, k))
        shape = (2, 8, 8)
    elif arch == "mlp":
        # BN1d (affine, affine=False, track_running_stats=False), many activations, dropout, Identity
        m = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(),
                          nn.Linear(6, 6), nn.BatchNorm1d(6, affine=False), nn.GELU(), nn.Dropout(0.3),
                          nn.Linear(6, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.ELU(), nn.SiLU(),
                          nn.Identity(), nn.Linear(5, 6), nn.BatchNorm1d(6), nn.LeakyReLU(0.1), nn.Sigmoid(),
                          nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Softplus(), nn.Hardtanh(-0.5, 0.5), nn.Linear(5, k))
        shape = (5,)
    elif arch == "bn1d_3d":
        # BatchNorm1d on [B, C, L] (first layer: only its own parameters), AvgPool1d, MaxPool1d under a
        # Linear through Flatten (1-d pooled form), 3-d BN taking pooled sums, then 2-d BN1d on top
        m = nn.Sequential(nn.BatchNorm1d(3), nn.Tanh(), nn.AvgPool1d(2), nn.BatchNorm1d(3), nn.ReLU(),
                          nn.MaxPool1d(2), nn.Flatten(), nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.Linear(4, k))
        shape = (3, 8)
    elif arch == "pool_no_bn":
        # max pool under a conv, then ReLU and a conv with no BN between: the conv beneath takes a pooled-only
        # gradient (materialized from zero); one ReLU instance used three times (no parameters: allowed)
        act = nn.ReLU()
        m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), act, nn.Conv2d(4, 4, 3, bias=False), act,
                          nn.MaxPool2d(2), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), act, nn.Flatten(),
                          nn.Linear(36, k))
        shape = (2, 10, 10)
    elif arch == "adaptive_max":
        # AdaptiveMaxPool2d (pooled form), Dropout2d keeping the pooled form (its mask at the maxima)
        m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Dropout2d(0.25),
                          nn.AdaptiveMaxPool2d(2), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
                          nn.Linear(16, k))
        shape = (2, 9, 9)
    elif arch == "bn1d_3d_adaptive":
        # AdaptiveMaxPool1d (1-d pooled form), Linear without bias, Dropout on [B, F]
        m = nn.Sequential(nn.BatchNorm1d(3), nn.ReLU(), nn.AdaptiveMaxPool1d(3), nn.Flatten(),
                          nn.Linear(9, 4, bias=False), nn.BatchNorm1d(4), nn.Dropout(0.2), nn.Linear(4, k))
        shape = (3, 7)
    elif arch == "pool_groups":
        # grouped conv (groups=4) taking a pooled-only gradient (per-group rows at the maxima), from a
        # dilated, overlapping (stride 1) max pool
        m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=4), nn.ReLU(),
                          nn.MaxPool2d(2, stride=1, dilation=2), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(64, k))
        shape = (2, 10, 10)
    elif arch == "pool_opts":
        # AvgPool2d with padding / ceil_mode / count_include_pad=False; padded, dilated, overlapping max pool
        # (pooled form) between 1x1 convs
        m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), nn.Conv2d(3, 3, 1),
                          nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.MaxPool2d(3, 2, 1, dilation=2),
                          nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, k))
        shape = (2, 13, 13)
    elif arch == "inplace":
        # in-place activations (the engine must not let them overwrite what it keeps)
        m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ELU(inplace=True), nn.Linear(5, 5),
                          nn.BatchNorm1d(5), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(5, 5),
                          nn.BatchNorm1d(5), nn.Hardtanh(-1.0, 1.0, inplace=True), nn.Linear(5, k))
        shape = (4,)
    elif arch == "frozen":
        m = make("vgg", torch.float64, seed)[0]
        m[0].weight.requires_grad_(False)
        m[5].bias.requires_grad_(False)
        shape = (2, 8, 8)
    else:
        raise KeyError(arch)
    _randomize_bn(m, seed)
    return m.to(dtype), shape, k


BN2D_ARCHS = ["vgg", "conv_geom", "groups_top", "post_act", "overlap_nested", "pool_no_bn", "adaptive_max",
              "pool_groups", "pool_opts", "frozen"]
ARCHS = BN2D_ARCHS + ["mlp", "inplace", "bn1d_3d", "bn1d_3d_adaptive"]


def _both(m, x, y, seed=123, **kw):
    """(reference total, reference per-layer), ((total, per-layer), report) with the RNG in the same state."""
    torch.manual_seed(seed)
    exp, exp_pl = reference(m, ce, x, y, mode="exact", per_layer=True)
    torch.manual_seed(seed)
    got = exact_report(m, ce, x, y, per_layer=True, **kw)
    return exp, exp_pl, got


# ---------------------------------------------------------------------------------------------- 1. fp64 zoo

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("B", [1, 2, 3, 17])
def test_fp64_matches_loop(arch, B):
    if B == 1 and arch not in BN2D_ARCHS:
        pytest.skip("BatchNorm1d on [1, C] has one value per channel (test_b1_bn1d_raises)")
    m, shape, k = make(arch)
    x, y = data(shape, B, k)
    exp, exp_pl, ((out, pl), rep) = _both(m, x, y, path="chain", max_chunk=5)
    assert rep["path"] == "chain"
    assert out.dtype == torch.float64 and out.shape == (B,)
    assert rel(out, exp) <= 1e-10
    assert list(pl) == [n for n, _ in trainable_parameters(m)]
    check_per_layer(pl, exp_pl, exp.max().item(), 1e-10)
    torch.testing.assert_close(torch.stack([v.square() for v in pl.values()]).sum(0).sqrt(), out, rtol=1e-12, atol=0)


def test_forms_are_exercised(monkeypatch):
    """The zoo reaches the forms it is meant to: the pooled form (a gradient on max-pool maxima), the affine-only
    input gradient under the top BN, several BNs per model (spies on exact_chain's internals)."""
    import bnmem_kernels.norms.exact_chain as ec

    pooled, basis = [], []
    assert hasattr(ec, "_Pooled") and hasattr(ec, "_conv_affine_input_grad"), "exact_chain internals renamed: update the spies"

    class Spy(ec._Pooled):
        def __init__(self, *a, **kw):
            pooled.append(1)
            super().__init__(*a, **kw)
    real_basis = ec._conv_affine_input_grad

    def spy_basis(*a, **kw):
        basis.append(True)
        return real_basis(*a, **kw)
    monkeypatch.setattr(ec, "_Pooled", Spy)
    monkeypatch.setattr(ec, "_conv_affine_input_grad", spy_basis)
    for arch, bns, want_pooled, want_basis in [
            ("vgg", 3, True, True), ("post_act", 5, True, True), ("overlap_nested", 3, True, True),
            ("mlp", 5, False, False), ("bn1d_3d", 3, True, False), ("pool_no_bn", 2, True, True),
            ("adaptive_max", 2, True, True), ("bn1d_3d_adaptive", 2, True, False), ("pool_groups", 2, True, True),
            ("pool_opts", 3, True, True)]:
        pooled.clear()
        basis.clear()
        m, shape, k = make(arch)
        x, y = data(shape, 4, k)
        rep = exact_report(m, ce, x, y, path="chain")[1]
        assert rep["path"] == "chain" and rep["bn_calls"] == bns, (arch, rep)
        assert bool(pooled) == want_pooled, arch
        assert any(basis) == want_basis, arch


def test_frozen_parameters_keys():
    m, shape, k = make("frozen")
    x, y = data(shape, 3, k)
    (_, pl), rep = exact_report(m, ce, x, y, per_layer=True, path="chain")
    assert rep["path"] == "chain"
    assert "0.weight" not in pl and "5.bias" not in pl and "0.bias" in pl and "5.weight" in pl
    assert list(pl) == [n for n, p in m.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("arch", ["mlp", "bn1d_3d", "bn1d_3d_adaptive"])
def test_b1_bn1d_raises(arch):
    m, shape, k = make(arch)
    x, y = data(shape, 1, k)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m.train()(x)                      # torch's own error, for comparison
    m.eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        exact_report(m, ce, x, y, path="chain")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        exact_report(m, ce, x, y)


def test_conv1d_is_refused_and_auto_matches_loop():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3)).double()
    x, y = data((3, 8), 5, 3)
    with pytest.raises(ChainUnsupported, match="Conv1d"):
        exact_report(m, ce, x, y, path="chain")
    exp = reference(m, ce, x, y, mode="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExactFallbackWarning)
        out, rep = exact_report(m, ce, x, y)
    assert rep["path"] != "chain" and "Conv1d" in rep["chain"]
    assert rel(out, exp) <= 1e-10


# ---------------------------------------------------------------------------------------------- 2. fp32

@pytest.mark.parametrize("arch", ["vgg", "post_act", "mlp"])
def test_fp32_vs_fp64_loop(arch):
    """fp32 engine vs the fp64 loop on the same (fp32-rounded) parameters and inputs."""
    m32, shape, k = make(arch, torch.float32)
    m64 = make(arch, torch.float32)[0].double()
    x, y = data(shape, 6, k, torch.float32)
    torch.manual_seed(7)
    exp = reference(m64, ce, x.double(), y, mode="exact")
    torch.manual_seed(7)
    out, rep = exact_report(m32, ce, x, y, path="chain")
    assert rep["path"] == "chain" and out.dtype == torch.float32
    assert rel(out, exp) <= 1e-4


# ---------------------------------------------------------------------------------------------- 3. chunks

@pytest.mark.parametrize("arch", ["vgg", "post_act", "bn1d_3d", "mlp"])
def test_chunk_sizes_give_the_same_result(arch):
    B = 7
    m, shape, k = make(arch)
    x, y = data(shape, B, k)
    outs = []
    for c in (1, 2, 5, B):
        torch.manual_seed(3)
        (tot, pl), rep = exact_report(m, ce, x, y, per_layer=True, path="chain", max_chunk=c)
        assert rep["path"] == "chain" and rep["chunk"] == c
        outs.append((tot, pl))
    for tot, pl in outs[1:]:
        torch.testing.assert_close(tot, outs[0][0], rtol=1e-12, atol=0)
        for n in pl:
            torch.testing.assert_close(pl[n], outs[0][1][n], rtol=1e-12, atol=1e-300)


# ---------------------------------------------------------------------------------------------- 4. zero biases

def test_bias_before_bn_is_exactly_zero():
    m, shape, k = make("vgg")
    x, y = data(shape, 5, k)
    exp, exp_pl = reference(m, ce, x, y, mode="exact", per_layer=True)
    (_, pl), rep = exact_report(m, ce, x, y, per_layer=True, path="chain")
    assert sorted(rep["zero_biases"]) == ["0.bias", "4.bias", "8.bias"]
    for n in ("0.bias", "4.bias", "8.bias"):
        assert torch.equal(pl[n], torch.zeros(5, dtype=torch.float64)), n
        assert (exp_pl[n] <= 1e-10 * exp).all()                       # the loop: zero up to rounding
    assert (pl["13.bias"] > 0).all()                                  # the head's bias is not before a BN
    # a bias NOT right before a BN (Conv -> ReLU -> BN) is not zeroed
    m2, shape2, k2 = make("post_act")
    x2, y2 = data(shape2, 5, k2)
    (_, pl2), rep2 = exact_report(m2, ce, x2, y2, per_layer=True, path="chain")
    assert "0.bias" not in rep2["zero_biases"] and (pl2["0.bias"] > 0).all()
    assert sorted(rep2["zero_biases"]) == ["12.bias", "3.bias", "8.bias"]


# ---------------------------------------------------------------------------------------------- 5. model unchanged

def test_model_left_unchanged():
    m, shape, k = make("mlp")
    m.eval()
    m[1].momentum = None                      # cumulative average: num_batches_tracked matters
    for p in list(m.parameters())[::2]:
        p.grad = torch.full_like(p, 0.25)
    grads = [p.grad for p in m.parameters()]
    params = [p.detach().clone() for p in m.parameters()]
    sd = {kk: v.clone() for kk, v in m.state_dict().items()}
    calls = []
    h1 = m.register_forward_hook(lambda *a: calls.append("top"))
    h2 = m[3].register_forward_pre_hook(lambda *a: None)
    hooks_before = [(dict(mm._forward_hooks), dict(mm._forward_pre_hooks), dict(mm._backward_hooks))
                    for mm in m.modules()]
    x, y = data(shape, 6, k)
    torch.manual_seed(9)
    exp = reference(m, ce, x, y, mode="exact")                # train-mode semantics despite eval()
    torch.manual_seed(9)
    out, rep = exact_report(m, ce, x, y)                     # hooks: the chain refuses, another path runs
    assert rep["path"] != "chain" and "hook" in rep["chain"] and rel(out, exp) <= 1e-10
    assert not any(mm.training for mm in m.modules())
    for kk, v in m.state_dict().items():
        assert torch.equal(v, sd[kk]), kk
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), params))
    assert all(p.grad is g for p, g in zip(m.parameters(), grads))
    assert all(g is None or torch.equal(g, torch.full_like(g, 0.25)) for g in grads)
    assert hooks_before == [(dict(mm._forward_hooks), dict(mm._forward_pre_hooks), dict(mm._backward_hooks))
                            for mm in m.modules()]
    assert all("forward" not in mm.__dict__ for mm in m.modules())
    h1.remove()
    h2.remove()
    # without hooks, the chain itself leaves everything as it was
    torch.manual_seed(9)
    out, rep = exact_report(m, ce, x, y, path="chain")
    assert rep["path"] == "chain" and rel(out, exp) <= 1e-10
    assert not any(mm.training for mm in m.modules())
    for kk, v in m.state_dict().items():
        assert torch.equal(v, sd[kk]), kk
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), params))
    assert all(p.grad is g for p, g in zip(m.parameters(), grads))
    # a training model stays in training mode
    m.train()
    exact_report(m, ce, x, y, path="chain")
    assert all(mm.training for mm in m.modules())


# ---------------------------------------------------------------------------------------------- 6. refusals

class _Wrapper(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


class _ScaledWrapper(_Wrapper):
    def forward(self, x):
        return self.body(x) * 2.0


class _SeqOwnForward(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2.0


def _refused(case):
    """(model, shape, k, loss_fn, dtype, message match) of a model/loss the chain engine refuses."""
    torch.manual_seed(0)
    dt = torch.float64
    loss = ce
    if case == "not_sequential":
        # (a plain wrapper is read off its fx trace as a chain: test_wrapper_is_read_as_a_chain)
        m, shape, k = make("vgg")
        m = _ScaledWrapper(m)
        match = "is not one the chain engine models"
    elif case == "seq_own_forward":
        m0, shape, k = make("vgg")
        m = _SeqOwnForward(*m0)
        match = "is not one the chain engine models"
    elif case == "nested_own_forward":
        m0, shape, k = make("vgg")
        m = nn.Sequential(_SeqOwnForward(*list(m0)[:4]), *list(m0)[4:])
        match = "overrides Sequential.forward"
    elif case == "groupnorm":
        m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4),
                          nn.Flatten(), nn.Linear(16, 3))
        shape, k = (2, 6, 6), 3
        match = "GroupNorm"
    elif case == "used_twice":
        lin = nn.Linear(4, 4)
        m = nn.Sequential(lin, nn.BatchNorm1d(4), nn.ReLU(), lin, nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
        shape, k = (4,), 3
        match = "used twice"
    elif case == "bf16":
        m, shape, k = make("mlp", torch.bfloat16)
        dt = torch.bfloat16
        match = "dtype"
    elif case == "coupling_loss":
        m, shape, k = make("vgg")

        def coupling_loss(o, t):
            li = F.cross_entropy(o, t, reduction="none")
            return li - F.cross_entropy(o, t, reduction="none").mean()
        loss = coupling_loss
        match = "couples the samples"
    elif case == "linear_3d":
        m = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(8, 4), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3))
        shape, k = (3, 8), 3
        match = "Linear on a 3-d input"
    elif case == "padding_mode":
        m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 36, 3))
        shape, k = (2, 6, 6), 3
        match = "padding_mode"
    elif case == "padding_same":
        m = nn.Sequential(nn.Conv2d(2, 3, 3, padding="same"), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 36, 3))
        shape, k = (2, 6, 6), 3
        match = "padding='same'"
    elif case == "no_vmap_rule":
        m, shape, k = make("vgg")

        def item_loss(o, t):       # per sample, but .item() has no vmap rule
            return F.cross_entropy(o, t, reduction="none") * (1.0 + 0.0 * o.detach().abs().max().item())
        loss = item_loss
        match = "vmap"
    elif case == "list_targets":
        m, shape, k = make("vgg")

        def list_loss(o, t):
            return F.cross_entropy(o, torch.as_tensor(t), reduction="none")
        loss = list_loss
        match = "targets of type list"
    else:
        raise KeyError(case)
    return m.to(dt), shape, k, loss, dt, match


REFUSED = ["not_sequential", "seq_own_forward", "nested_own_forward", "groupnorm", "used_twice", "bf16",
           "coupling_loss", "linear_3d", "padding_mode", "padding_same", "list_targets"]


def test_wrapper_is_read_as_a_chain():
    """An nn.Module whose forward only calls a Sequential: the chain engine, from the module's fx trace."""
    torch.manual_seed(0)
    m, shape, k = make("vgg")
    w = _Wrapper(m)
    x, y = data(shape, 6, k)
    out, rep = exact_report(w, ce, x, y, path="chain")
    assert rep["path"] == "chain" and rep["traced"] and rel(out, reference(m, ce, x, y, mode="exact")) <= 1e-10


def test_loss_without_vmap_rule_runs_on_the_chain():
    """The chain reads the per-sample gradients at the output off the batch loss (checked block-diagonal by
    a random probe), so a per-sample loss with no vmap rule (.item() of a detached batch term) is fine."""
    m, shape, k, loss, dt, _ = _refused("no_vmap_rule")
    x, y = data(shape, 6, k, dt)
    out, rep = exact_report(m, loss, x, y, path="chain")
    assert rep["path"] == "chain" and rel(out, reference(m, loss, x, y, mode="exact")) <= 1e-10


@pytest.mark.parametrize("case", REFUSED)
def test_refusals(case):
    m, shape, k, loss, dt, match = _refused(case)
    x, y = data(shape, 6, k, dt)
    if case == "list_targets":
        y = y.tolist()
    with pytest.raises(ChainUnsupported, match=match):
        exact_report(m, loss, x, y, path="chain")
    torch.manual_seed(11)
    exp = reference(m, loss, x, y, mode="exact")
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExactFallbackWarning)
        out, rep = exact_report(m, loss, x, y)
    assert rep["path"] in ("coupled", "seed_batched")
    assert match in rep["chain"] or (case == "nested_own_forward" and "overrides" in rep["chain"])
    if dt == torch.float64:
        assert rel(out, exp) <= 1e-10
    else:
        # bf16: the same loop numbers up to bf16 rounding (measured: identical; stated limit 2 bf16 ulps)
        assert out.dtype == dt and rel(out, exp) <= 2 ** -7


@pytest.mark.parametrize("arch", ["vgg", "mlp"])
def test_auto_takes_chain_without_warning(arch):
    m, shape, k = make(arch)
    x, y = data(shape, 6, k)
    torch.manual_seed(5)
    exp = reference(m, ce, x, y, mode="exact")
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExactFallbackWarning)
        out, rep = exact_report(m, ce, x, y)
    assert rep["path"] == "chain" and "chain" not in rep
    assert rel(out, exp) <= 1e-10


def test_auto_after_refusal_uses_the_same_dropout_masks():
    """A chain refusal after the chain's forward (coupling loss) rewinds the RNG: the next path's forward
    draws the loop's dropout masks."""
    m, shape, k = make("mlp")

    def loss(o, t):
        return F.cross_entropy(o, t, reduction="none") - F.cross_entropy(o, t, reduction="none").mean()
    x, y = data(shape, 6, k)
    torch.manual_seed(21)
    exp = reference(m, loss, x, y, mode="exact")
    torch.manual_seed(21)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExactFallbackWarning)
        out, rep = exact_report(m, loss, x, y)
    assert "couples the samples" in rep["chain"]
    assert rel(out, exp) <= 1e-10


def test_other_losses():
    """MSE with float targets, and targets=None (a loss of the outputs only)."""
    m, shape, _ = make("conv_geom")
    x, _ = data(shape, 5, 3)
    t = torch.randn(5, 3, dtype=torch.float64)
    mse = lambda o, tt: (o - tt).square().sum(1)        # noqa: E731
    exp = reference(m, mse, x, t, mode="exact")
    out, rep = exact_report(m, mse, x, t, path="chain")
    assert rep["path"] == "chain" and rel(out, exp) <= 1e-10
    sq = lambda o, tt: o.square().sum(1)                # noqa: E731
    exp = reference(m, sq, x, None, mode="exact")
    out, rep = exact_report(m, sq, x, None, path="chain")
    assert rep["path"] == "chain" and rel(out, exp) <= 1e-10


# ---------------------------------------------------------------------------------------------- known bugs

def _bn_after_bn(dim):
    torch.manual_seed(0)
    if dim == 1:
        m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
        shape = (4,)
    else:
        m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(48, 3))
        shape = (2, 6, 6)
    _randomize_bn(m, 0)
    return m.double(), shape


@pytest.mark.parametrize("dim", [1, 2])
def test_bn_directly_after_bn(dim):
    m, shape = _bn_after_bn(dim)
    x, y = data(shape, 6, 3)
    exp = reference(m, ce, x, y, mode="exact")
    try:
        out, rep = exact_report(m, ce, x, y, path="chain")
    except ChainUnsupported:
        out, rep = exact_report(m, ce, x, y)          # a refusal is fine if auto then matches the loop
    assert rel(out, exp) <= 1e-10


@pytest.mark.parametrize("where", ["conv_hook", "bn_hook", "linear_pre_hook", "global_hook"])
def test_forward_hooks_are_modelled_or_refused(where):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).double()
    if where == "conv_hook":
        m[0].register_forward_hook(lambda mod, i, o: o * 2.0)
    elif where == "bn_hook":
        m[1].register_forward_hook(lambda mod, i, o: o * 2.0)
    elif where == "linear_pre_hook":
        m[4].register_forward_pre_hook(lambda mod, i: (i[0] * 3.0,))
    x, y = data((2, 6, 6), 5, 3)
    hook = None
    if where == "global_hook":
        hook = nn.modules.module.register_module_forward_hook(
            lambda mod, i, o: o * 1.5 if isinstance(mod, nn.Conv2d) else None)
    try:
        exp = reference(m, ce, x, y, mode="exact")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExactFallbackWarning)
            out, rep = exact_report(m, ce, x, y)
    finally:
        if hook is not None:
            hook.remove()
    assert rel(out, exp) <= 1e-10, rep
    assert rep["path"] != "chain" and "hook" in rep["chain"]


def test_gradient_coupling_loss_with_equal_values_is_refused_or_exact():
    m, shape, k = make("vgg")
    x, y = data(shape, 6, k)

    def loss(o, t):
        li = F.cross_entropy(o, t, reduction="none")
        return li - li.mean() + li.mean().detach()        # values: li; gradients: li - mean
    exp = reference(m, loss, x, y, mode="exact")
    with pytest.raises(ChainUnsupported, match="couples the samples in its gradient"):
        exact_report(m, loss, x, y, path="chain")
    from bnmem_kernels.norms.exact_coupled import Unsupported
    with pytest.raises(Unsupported, match="couples the samples in its gradient"):
        exact_report(m, loss, x, y, path="coupled")       # the coupled path checks it too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExactFallbackWarning)
        out, rep = exact_report(m, loss, x, y)            # auto: the general (loop) engine
    assert rep["path"] == "seed_batched" and rel(out, exp) <= 1e-10


# ---------------------------------------------------------------------------------------------- 7. bad input

def test_bad_input_errors():
    m, shape, k = make("vgg")
    x, y = data(shape, 4, k)
    with pytest.raises(ValueError, match="max_chunk must be >= 1"):
        exact_report(m, ce, x, y, path="chain", max_chunk=0)
    with pytest.raises(ValueError, match="reduction"):
        exact_report(m, lambda o, t: F.cross_entropy(o, t, reduction="mean"), x, y, path="chain")
    with pytest.raises(ValueError, match="path must be"):
        exact_report(m, ce, x, y, path="chains")


# ---------------------------------------------------------------------------------------------- 8. workspace pool

def test_release_workspaces():
    m, shape, k = make("vgg")
    x, y = data(shape, 5, k)
    exact_report(m, ce, x, y, path="chain")
    nb = release_workspaces()
    assert isinstance(nb, int) and nb > 0           # the default pool (256 MiB) kept this call's buffers
    assert release_workspaces() == 0


def test_pool_disabled_and_bad_env(monkeypatch):
    m, shape, k = make("post_act")
    x, y = data(shape, 5, k)
    exp = reference(m, ce, x, y, mode="exact")
    release_workspaces()
    with_pool = [exact_report(m, ce, x, y, path="chain")[0] for _ in range(2)]    # 2nd call reuses the pool
    monkeypatch.setenv("BNMEM_EXACT_POOL_MB", "0")
    release_workspaces()
    no_pool = exact_report(m, ce, x, y, path="chain")[0]
    assert release_workspaces() == 0
    assert torch.equal(no_pool, with_pool[0]) and torch.equal(with_pool[1], with_pool[0])
    assert rel(no_pool, exp) <= 1e-10
    monkeypatch.setenv("BNMEM_EXACT_POOL_MB", "abc")
    with pytest.raises(ValueError, match="BNMEM_EXACT_POOL_MB"):
        exact_report(m, ce, x, y, path="chain")
    monkeypatch.delenv("BNMEM_EXACT_POOL_MB")
    release_workspaces()


def test_two_threads_concurrently():
    cases = []
    for arch, B in (("vgg", 5), ("post_act", 6)):
        m, shape, k = make(arch)
        x, y = data(shape, B, k)
        cases.append((m, x, y, reference(m, ce, x, y, mode="exact")))
    results = {0: [], 1: []}
    errors = []
    barrier = threading.Barrier(2)

    def work(i):
        m, x, y, _ = cases[i]
        try:
            barrier.wait()
            for _ in range(3):
                out, rep = exact_report(m, ce, x, y, path="chain", max_chunk=2)
                results[i].append((out, rep["path"]))
        except Exception as exc:      # reported in the main thread
            errors.append(exc)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert len(results[i]) == 3
        for out, path in results[i]:
            assert path == "chain" and rel(out, cases[i][3]) <= 1e-10
    release_workspaces()


# ---------------------------------------------------------------------------------------------- 9. layouts

def test_non_contiguous_inputs():
    m, shape, k = make("vgg")
    g = torch.Generator().manual_seed(4)
    big = torch.randn(5, 2, 16, 16, generator=g, dtype=torch.float64)
    x = big[:, :, ::2, ::2]
    assert not x.is_contiguous()
    y = torch.randint(0, k, (5,), generator=g)
    exp = reference(m, ce, x.contiguous(), y, mode="exact")
    out, rep = exact_report(m, ce, x, y, path="chain")
    assert rep["path"] == "chain" and rel(out, exp) <= 1e-10
    xc = torch.randn(5, 8, 8, 2, generator=g, dtype=torch.float64).permute(0, 3, 1, 2)   # channels-last-like
    assert not xc.is_contiguous()
    assert rel(exact_report(m, ce, xc, y, path="chain")[0], reference(m, ce, xc.contiguous(), y, mode="exact")) <= 1e-10

    m2, shape2, k2 = make("mlp")
    xt = torch.randn(5, 7, generator=g, dtype=torch.float64).t()        # [7, 5], transposed view
    y2 = torch.randint(0, k2, (7,), generator=g)
    torch.manual_seed(2)
    exp2 = reference(m2, ce, xt.contiguous(), y2, mode="exact")
    torch.manual_seed(2)
    assert rel(exact_report(m2, ce, xt, y2, path="chain")[0], exp2) <= 1e-10


# ---------------------------------------------------------------------------------------------- 10. kernel backends

@pytest.mark.parametrize("backend", [None, "reference", "cpu", "triton", "cuda"])
def test_every_backend_of_the_pooled_kernel_gives_the_loops_numbers(backend):
    """The chain's weight gradients on max-pool maxima go through pooled_conv_weight_grad on the chosen
    backend (Triton in the interpreter here); auto without a compiled backend takes the plain-PyTorch
    gather route ("torch")."""
    from bnmem_kernels._backend import unavailable_reason

    if backend is not None and unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(f"{backend}: {unavailable_reason(backend, torch.device('cpu'))}")
    m, shape, k = make("vgg")
    x, y = data(shape, 5, k)
    exp, exp_pl = reference(m, ce, x, y, mode="exact", per_layer=True)
    (out, pl), rep = exact_report(m, ce, x, y, path="chain", per_layer=True, backend=backend)
    assert rep["pooled_wgrad_backend"] == (backend or "cpu")
    assert rel(out, exp) <= 1e-10
    check_per_layer(pl, exp_pl, exp.max().item(), 1e-10)


def test_auto_without_compiled_backends_takes_the_torch_route(monkeypatch):
    import bnmem_kernels._backend as be

    real = be.unavailable_reason
    monkeypatch.setattr(be, "unavailable_reason", lambda b, d: "disabled in this test" if b == "cpu" else real(b, d))
    m, shape, k = make("vgg")
    x, y = data(shape, 5, k)
    out, rep = exact_report(m, ce, x, y, path="chain")
    assert rep["pooled_wgrad_backend"] == "torch"
    assert rel(out, reference(m, ce, x, y, mode="exact")) <= 1e-10


@pytest.mark.parametrize("route", ["basis", "stacked"])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (1, 2), (2, 1)])
def test_affine_only_input_gradient_under_the_top_bn(monkeypatch, stride, dilation, route):
    """The conv right under the top BN takes its input gradient from the affine part alone (plus alpha @ P):
    by the basis Q (one grouped convolution per call; stride 1 as a forward convolution, stride 2 as a
    transposed one; AFFINE_BASIS_BUDGET = inf and AFFINE_BASIS_MIN_B = 1 here) or, where Q would be too
    large or B small (budget 0 here), by transposed convolutions of xhat with the seeds' kernels stacked:
    the loop's numbers either way."""
    import bnmem_kernels.norms.exact_chain as ec

    built, basis = [], []
    real, real_basis = ec._conv_affine_input_grad, ec._conv_affine_basis

    def spy(*a, **kw):
        built.append(True)
        return real(*a, **kw)

    def spy_basis(*a, **kw):
        basis.append(True)
        return real_basis(*a, **kw)
    monkeypatch.setattr(ec, "_conv_affine_input_grad", spy)
    monkeypatch.setattr(ec, "_conv_affine_basis", spy_basis)
    monkeypatch.setattr(ec, "AFFINE_BASIS_BUDGET", 0.0 if route == "stacked" else float("inf"))
    monkeypatch.setattr(ec, "AFFINE_BASIS_MIN_B", 1)
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 5, 3, stride=stride, padding=dilation, dilation=dilation), nn.BatchNorm2d(5),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double()
    x, y = data((2, 7, 7), 6, 3)
    exp, exp_pl = reference(m, ce, x, y, mode="exact", per_layer=True)
    (out, pl), rep = exact_report(m, ce, x, y, path="chain", per_layer=True, max_chunk=4)
    assert built and all(built)
    assert bool(basis) == (route == "basis")
    assert rel(out, exp) <= 1e-10
    check_per_layer(pl, exp_pl, exp.max().item(), 1e-10)


@pytest.mark.parametrize("route", ["basis", "stacked"])
@pytest.mark.parametrize("stride,pool", [(1, (2, 2)), (2, (2, 2)), (1, (3, 2)), (1, (2, 1))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_top_conv_into_the_merge_pool(monkeypatch, stride, pool, route, dtype):
    """The conv under the top BN writes its (affine-only) input gradient straight into the values of the max
    pool beneath, where the diagonal part joins (the merge): plain, strided, overlapping (repeated maxima)
    and stride-1 pools, both routes, chunks that do not divide B (the workspaces of the last, smaller chunk
    are views of the first one's)."""
    import bnmem_kernels.norms.exact_chain as ec

    monkeypatch.setattr(ec, "AFFINE_BASIS_BUDGET", 0.0 if route == "stacked" else float("inf"))
    monkeypatch.setattr(ec, "AFFINE_BASIS_MIN_B", 1)
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(*pool),
                      nn.Conv2d(4, 5, 3, stride=stride, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    _randomize_bn(m, 5)
    x, y = data((2, 9, 9), 7, 3)
    exp, exp_pl = reference(m.double(), ce, x, y, mode="exact", per_layer=True)
    (out, pl), rep = exact_report(m.to(dtype), ce, x.to(dtype), y, path="chain", per_layer=True, max_chunk=3)
    assert rep["path"] == "chain" and rep["chunk"] == 3
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel(out.double(), exp) <= tol
    check_per_layer({k: v.double() for k, v in pl.items()}, exp_pl, exp.max().item(), tol)


@pytest.mark.parametrize("acts", ["relu", "elu_dropout", "identity"])
def test_elementwise_layers_under_max_pools(acts):
    """Elementwise layers under a max pool (ELU and dropout: non-0/1 derivatives, several per pool; none) act
    on the pool's values, which the conv above wrote (the dense route at the middle block, the affine route
    at the merge pool, where the diagonal part joins): the loop's numbers."""
    def block(i, o):
        act = {"relu": [nn.ReLU()], "elu_dropout": [nn.ELU(), nn.Dropout(0.25)], "identity": [nn.Identity()]}[acts]
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), *act, nn.MaxPool2d(2)]
    torch.manual_seed(8)
    m = nn.Sequential(*block(2, 4), *block(4, 5), nn.Conv2d(5, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Flatten(), nn.Linear(16, 3)).double()
    _randomize_bn(m, 8)
    x, y = data((2, 8, 8), 6, 3)
    exp, exp_pl, ((out, pl), rep) = _both(m, x, y, path="chain", max_chunk=4)
    assert rep["path"] == "chain"
    assert rel(out, exp) <= 1e-10
    check_per_layer(pl, exp_pl, exp.max().item(), 1e-10)


def test_first_block_xhat_dropped(monkeypatch):
    """The first block's BN (conv -> BN -> ReLU -> max pool -> conv) keeps only its two caches, not xhat
    (report["xhat_dropped"]); a BN whose conv beneath needs its input gradient keeps it. Same numbers."""
    import bnmem_kernels.norms.exact_chain as ec

    kept = []
    real = ec._drop_low_xhats

    def spy(recs, bns, need_below):
        n = real(recs, bns, need_below)
        kept.append([recs[k].xhat is not None for k in bns])
        return n
    monkeypatch.setattr(ec, "_drop_low_xhats", spy)
    m, shape, k = make("vgg")
    x, y = data(shape, 5, k)
    exp, exp_pl, ((out, pl), rep) = _both(m, x, y, path="chain", max_chunk=2)
    assert rep["xhat_dropped"] == 1 and kept[-1] == [False, True, True], (rep, kept)
    assert rel(out, exp) <= 1e-10
    check_per_layer(pl, exp_pl, exp.max().item(), 1e-10)
    m2 = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                       nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                       nn.Flatten(), nn.Linear(64, k)).double()
    _randomize_bn(m2, 2)
    x2, y2 = data((2, 8, 8), 5, k)
    exp2, exp2_pl, ((out2, pl2), rep2) = _both(m2, x2, y2, path="chain", max_chunk=2)
    assert rep2["xhat_dropped"] == 0 and kept[-1] == [True, True], (rep2, kept)
    assert rel(out2, exp2) <= 1e-10
    check_per_layer(pl2, exp2_pl, exp2.max().item(), 1e-10)


@pytest.mark.parametrize("route", ["basis", "stacked"])
def test_b64_vgg(monkeypatch, route):
    """B = 64 (the bench's batch size) on the VGG-like model, default chunk, both routes of the top conv."""
    import bnmem_kernels.norms.exact_chain as ec

    monkeypatch.setattr(ec, "AFFINE_BASIS_BUDGET", 0.0 if route == "stacked" else float("inf"))
    monkeypatch.setattr(ec, "AFFINE_BASIS_MIN_B", 1)
    m, shape, k = make("vgg")
    x, y = data(shape, 64, k)
    exp, exp_pl, ((out, pl), rep) = _both(m, x, y)
    assert rep["path"] == "chain" and rep["chunk"] == 16
    assert rel(out, exp) <= 1e-10
    check_per_layer(pl, exp_pl, exp.max().item(), 1e-10)
