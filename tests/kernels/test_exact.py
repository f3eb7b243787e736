"""mode="exact" engines against the autograd loop (reference.per_sample_grad_norms(mode="exact"))."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnmem_kernels.norms._checks import trainable_parameters
from bnmem_kernels.norms.exact import ExactFallbackWarning, exact_per_sample_grad_norms, exact_report
from bnmem_kernels.reference import per_sample_grad_norms as reference
from _helpers import ce, data, rel

PATHS = ("coupled", "seed_batched")


class Basic(nn.Module):
    """ResNet basic block with a downsample 1x1 conv + BN."""
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.down(x))


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.c2, self.b2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.c3, self.b3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        o = F.relu(self.b1(self.c1(x)))
        o = F.relu(self.b2(self.c2(o)))
        return F.relu(self.b3(self.c3(o)) + self.down(x))


class BatchCentering(nn.Module):
    """A module the coupled path does not know: couples samples through x - mean over the batch."""
    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return (x - x.mean(0, keepdim=True)) * self.w.view(1, -1, *[1] * (x.dim() - 2))


def make(arch, dtype=torch.float64, seed=0):
    """(model, input shape without B, number of classes)."""
    torch.manual_seed(seed)
    if arch == "cnn":          # several BN2d, bias right before BN, max pool
        m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
        shape = (2, 6, 6)
    elif arch == "mlp_bn1d":   # BN1d anywhere, affine=False, track_running_stats=False, activations
        m = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4),
                          nn.BatchNorm1d(4, affine=False), nn.GELU(), nn.Linear(4, 5),
                          nn.BatchNorm1d(5, track_running_stats=False), nn.ELU(), nn.Linear(5, 3))
        shape = (5,)
    elif arch == "resnet_basic":
        m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                          Basic(3, 4, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        shape = (2, 6, 6)
    elif arch == "resnet_bottleneck":
        m = nn.Sequential(Bottleneck(2, 2, 4, 2), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 3))
        shape = (2, 4, 4)
    elif arch == "mixed":      # BN with GN/LN, conv stride/dilation/groups, frozen params, other activations
        m = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2), nn.BatchNorm2d(4), nn.SiLU(),
                          nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.GroupNorm(2, 4), nn.LeakyReLU(0.1),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False), nn.Softplus(),
                          nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 3))
        m[3].weight.requires_grad_(False)   # frozen parameters
        m[11].bias.requires_grad_(False)
        shape = (2, 7, 7)
    elif arch == "dropout":
        m = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 6),
                          nn.BatchNorm1d(6), nn.Dropout(0.2), nn.Linear(6, 3))
        shape = (5,)
    elif arch == "tiny":       # for B = 64
        m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
        shape = (1, 4, 4)
    elif arch == "coupled_custom":
        m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 5), BatchCentering(5),
                          nn.Tanh(), nn.Linear(5, 3))
        shape = (4,)
    else:
        raise KeyError(arch)
    return m.to(dtype), shape, 3 if arch != "tiny" else 2


def check_per_layer(pl, expected_pl, total_scale, tol):
    """Per parameter: relative error, or (for entries that are zero up to rounding, e.g. a bias right
    before a BN) an absolute error relative to the total norm."""
    for n, v in expected_pl.items():
        err = ((pl[n].double() - v.double()).abs() / (v.double().abs() + 1e-4 * total_scale)).max().item()
        assert err <= tol, (n, err)


ARCHS = ["cnn", "mlp_bn1d", "resnet_basic", "resnet_bottleneck", "mixed"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("B", [2, 3, 17])
def test_fp64_matches_loop(path, arch, B):
    m, shape, k = make(arch)
    x, y = data(shape, B, k)
    exp, exp_pl = reference(m, ce, x, y, mode="exact", per_layer=True)
    (out, pl), rep = exact_report(m, ce, x, y, per_layer=True, path=path, max_chunk=5)
    assert rep["path"] == path
    assert out.dtype == torch.float64 and out.shape == (B,)
    assert rel(out, exp) <= 1e-10
    assert list(pl) == [n for n, _ in trainable_parameters(m)]
    check_per_layer(pl, exp_pl, exp.max().item(), 1e-10)
    # per_layer consistency: total^2 = sum of per-parameter squares
    torch.testing.assert_close(torch.stack([v.square() for v in pl.values()]).sum(0).sqrt(), out, rtol=1e-12, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ["cnn", "resnet_basic", "mixed"])
def test_b1_bn2d(path, arch):
    m, shape, k = make(arch)
    x, y = data(shape, 1, k)
    exp = reference(m, ce, x, y, mode="exact")
    out = exact_report(m, ce, x, y, path=path)[0]
    assert rel(out, exp) <= 1e-10


@pytest.mark.parametrize("path", PATHS)
def test_b64_tiny(path):
    m, shape, k = make("tiny")
    x, y = data(shape, 64, k)
    exp = reference(m, ce, x, y, mode="exact")
    assert rel(exact_report(m, ce, x, y, path=path)[0], exp) <= 1e-10


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ["cnn", "resnet_basic", "mlp_bn1d"])
def test_fp32_vs_fp64_loop(path, arch):
    """fp32 engine vs the fp64 loop on the same (fp32-rounded) parameters and inputs."""
    m32, shape, k = make(arch, torch.float32)
    m64 = make(arch, torch.float32)[0].double()
    x, y = data(shape, 6, k, torch.float32)
    exp = reference(m64, ce, x.double(), y, mode="exact")
    out = exact_report(m32, ce, x, y, path=path)[0]
    assert out.dtype == torch.float32
    assert rel(out, exp) <= 1e-4


@pytest.mark.parametrize("route", ["B", "S"])
def test_coupled_routes_agree(route):
    m, shape, k = make("resnet_basic")
    x, y = data(shape, 9, k)
    exp = reference(m, ce, x, y, mode="exact")
    out, rep = exact_report(m, ce, x, y, path="coupled", route=route, max_chunk=4)
    assert set(rep["routes"]) == {route}
    assert rel(out, exp) <= 1e-10


@pytest.mark.parametrize("batched", [True, False])
def test_batched_and_per_seed_vjps_agree(batched):
    from bnmem_kernels.norms.exact_coupled import coupled_sq_norms
    from bnmem_kernels.norms.exact_fallback import seed_batched_sq_norms

    m, shape, k = make("cnn")
    x, y = data(shape, 5, k)
    exp = reference(m, ce, x, y, mode="exact")
    names, params = zip(*trainable_parameters(m))
    m.train()
    sq = seed_batched_sq_norms(ce(m(x), y), names, params, torch.float64, 3, batched=batched)
    assert rel(torch.stack(list(sq.values())).sum(0).sqrt(), exp) <= 1e-10
    sq, _ = coupled_sq_norms(m, ce, (x,), y, names, params, torch.float64, 5, 3, batched=batched)
    assert rel(torch.stack(list(sq.values())).sum(0).sqrt(), exp) <= 1e-10


@pytest.mark.parametrize("path", PATHS)
def test_chunk_sizes_give_the_same_result(path):
    B = 5
    m, shape, k = make("cnn")
    x, y = data(shape, B, k)
    outs = [exact_report(m, ce, x, y, path=path, max_chunk=c)[0] for c in range(1, B + 1)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-12, atol=0)


def test_bias_before_bn_is_exactly_zero():
    m, shape, k = make("cnn")
    x, y = data(shape, 5, k)
    (_, pl), rep = exact_report(m, ce, x, y, per_layer=True, path="coupled")
    assert sorted(rep["zero_biases"]) == ["0.bias", "4.bias"]
    assert torch.equal(pl["0.bias"], torch.zeros(5, dtype=torch.float64))
    assert torch.equal(pl["4.bias"], torch.zeros(5, dtype=torch.float64))
    assert (pl["8.bias"] > 0).all()        # the head's bias is not before a BN
    # the general engine: zero up to rounding
    (tot, pl2), _ = exact_report(m, ce, x, y, per_layer=True, path="seed_batched")
    assert (pl2["0.bias"] <= 1e-13 * tot).all()


def test_bias_feeding_bn_and_something_else_is_not_zeroed():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn, self.head = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, x):
            z = self.lin(x)
            return self.head(self.bn(z) + 0.5 * z)

    torch.manual_seed(0)
    m = Both().double()
    x, y = data((3,), 6, 2)
    exp, exp_pl = reference(m, ce, x, y, mode="exact", per_layer=True)
    (out, pl), rep = exact_report(m, ce, x, y, per_layer=True, path="coupled")
    assert rep["zero_biases"] == []
    assert (pl["lin.bias"] > 1e-6).all() and rel(pl["lin.bias"], exp_pl["lin.bias"]) <= 1e-10


@pytest.mark.parametrize("path", PATHS + ("auto",))
def test_dropout_one_forward_one_mask(path):
    """With the RNG in the same state, the one forward draws the loop's masks: same numbers."""
    m, shape, k = make("dropout")
    x, y = data(shape, 9, k)
    torch.manual_seed(123)
    exp = reference(m, ce, x, y, mode="exact")
    torch.manual_seed(123)
    out, rep = exact_report(m, ce, x, y, path=path)
    assert rep["path"] == path or path == "auto"
    assert rel(out, exp) <= 1e-10


def test_unknown_coupling_falls_back_with_a_warning():
    m, shape, k = make("coupled_custom")
    x, y = data(shape, 12, k)        # B > 2C: the coupled plan is cheaper, so auto tries it
    exp = reference(m, ce, x, y, mode="exact")
    with pytest.warns(ExactFallbackWarning, match="couples samples other than through BatchNorm"):
        out, rep = exact_report(m, ce, x, y)
    assert rep["path"] == "seed_batched" and rel(out, exp) <= 1e-10
    from bnmem_kernels.norms.exact_coupled import Unsupported
    with pytest.raises(Unsupported):
        exact_report(m, ce, x, y, path="coupled")


def test_auto_takes_the_coupled_path_without_warning():
    m, shape, k = make("resnet_basic")
    x, y = data(shape, 30, k)        # 24 passes (S routes) < B = 30
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExactFallbackWarning)
        out, rep = exact_report(m, ce, x, y)
    assert rep["path"] == "coupled" and rep["passes"] == 24
    # stem conv on the data: J of its BN in closed form; block's bn2 and downsample BN are top BNs;
    # block's bn1 (S route): its conv1 block of J in closed form, left out of its row passes
    assert rep["routes"] == ["closed", "S", "S", "S"] and rep["closed_form"] == [0, 1, 2, 3]
    assert rel(out, reference(m, ce, x, y, mode="exact")) <= 1e-10


def test_auto_policy_on_cpu_takes_the_loop_when_the_plan_is_not_cheaper():
    m, shape, k = make("resnet_basic")
    x, y = data(shape, 4, k)         # B-route: 4 passes, no fewer than the loop's
    calls = []
    h = m.register_forward_hook(lambda *a: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExactFallbackWarning)
        out, rep = exact_report(m, ce, x, y)
    h.remove()
    assert rep["path"] == "seed_batched" and rep["reason"].startswith("policy:")
    assert len(calls) == 1            # one plain forward decides the policy; the loop runs on its losses
    assert rel(out, reference(m, ce, x, y, mode="exact")) <= 1e-10


@pytest.mark.parametrize("arch", ["mlp_bn1d", "resnet_basic", "resnet_bottleneck", "dropout"])
@pytest.mark.parametrize("chunk", [3, 20])
def test_s_route_with_closed_form_layer_beneath(arch, chunk):
    """An S-route BatchNorm that is not the top one, with a Linear/Conv right beneath it: that layer's block
    of J in closed form, left out of the row passes (which still cross it to the layers below)."""
    m, shape, k = make(arch)
    B = 20
    x, y = data(shape, B, k)
    torch.manual_seed(5)
    exp, exp_pl = reference(m, ce, x, y, mode="exact", per_layer=True)
    torch.manual_seed(5)
    (out, pl), rep = exact_report(m, ce, x, y, per_layer=True, path="coupled", max_chunk=chunk)
    s_closed = [kk for kk in rep["closed_form"] if rep["routes"][kk] == "S"]
    assert s_closed, rep
    assert rel(out, exp) <= 1e-10
    check_per_layer(pl, exp_pl, exp.max().item(), 1e-10)


@pytest.mark.parametrize("arch", ARCHS + ["dropout", "tiny"])
@pytest.mark.parametrize("B", [2, 3, 9, 17, 64])
def test_policy_precheck_reads_the_coupled_plan(arch, B):
    """The CPU policy decides on a plain forward; its plan must be the coupled forward's, route by route."""
    from bnmem_kernels.norms.exact_coupled import coupled_sq_norms, policy_precheck
    from bnmem_kernels.norms._state import preserved_model_state, set_mode

    m, shape, k = make(arch)
    x, y = data(shape, B, k)
    names, params = zip(*trainable_parameters(m))
    with preserved_model_state(m), torch.enable_grad():
        set_mode(m, "exact")
        policy_precheck.last_plan = None
        _, why = policy_precheck(m, ce, (x,), y, names, params, B)
        plan, n = policy_precheck.last_plan
        _, info = coupled_sq_norms(m, ce, (x,), y, names, params, torch.float64, B, 16)
    assert (plan, n) == (info["routes"], info["passes"])
    assert (why is not None) == (n >= B)


@pytest.mark.parametrize("path", PATHS)
def test_model_left_unchanged(path):
    m, shape, k = make("resnet_basic")
    m.eval()
    m[1].momentum = None                       # cumulative average: num_batches_tracked matters
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    grads = [p.grad for p in m.parameters()]
    sd = {kk: v.clone() for kk, v in m.state_dict().items()}
    x, y = data(shape, 5, k)
    exact_report(m, ce, x, y, path=path)
    assert not any(mm.training for mm in m.modules())
    for kk, v in m.state_dict().items():
        assert torch.equal(v, sd[kk]), kk
    assert all(p.grad is g for p, g in zip(m.parameters(), grads))
    assert all(len(mm._forward_hooks) == 0 and "forward" not in mm.__dict__ for mm in m.modules())


def test_public_entry_point_and_errors():
    m, shape, k = make("cnn")
    x, y = data(shape, 4, k)
    out = exact_per_sample_grad_norms(m, ce, x, y)
    assert rel(out, reference(m, ce, x, y, mode="exact")) <= 1e-10
    with pytest.raises(ValueError, match="max_chunk must be >= 1"):
        exact_per_sample_grad_norms(m, ce, x, y, max_chunk=0)
    with pytest.raises(TypeError, match="max_chunk"):
        exact_per_sample_grad_norms(m, ce, x, y, max_chunk=2.0)
    bad = x.clone()
    bad[2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        exact_per_sample_grad_norms(m, ce, bad, y)
    with pytest.raises(ValueError, match="empty batch"):
        exact_per_sample_grad_norms(m, ce, x[:0], y[:0])
    with pytest.raises(ValueError, match="shape"):
        exact_per_sample_grad_norms(m, lambda o, t: ce(o, t).mean(), x, y)
    with pytest.raises(TypeError, match="model must be"):
        exact_per_sample_grad_norms(lambda z: z, ce, x, y)
    with pytest.raises(ValueError, match="targets must have the batch size"):
        exact_per_sample_grad_norms(m, ce, x, y[:3])
    with pytest.raises(ValueError, match="unknown backend"):
        exact_per_sample_grad_norms(m, ce, x, y, backend="gpu")
    m1, s1, k1 = make("mlp_bn1d")
    x1, y1 = data(s1, 1, k1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        exact_per_sample_grad_norms(m1, ce, x1, y1)


def test_public_api_routes_exact_here():
    import bnmem_kernels

    m, shape, k = make("resnet_bottleneck")
    x, y = data(shape, 5, k)
    exp, exp_pl = reference(m, ce, x, y, mode="exact", per_layer=True)
    out, pl = bnmem_kernels.per_sample_grad_norms(m, ce, x, y, mode="exact", per_layer=True, max_chunk=2)
    assert rel(out, exp) <= 1e-10
    check_per_layer(pl, exp_pl, exp.max().item(), 1e-10)


class _VirtualBatchNorm2d(nn.BatchNorm2d):
    """Ghost BN: statistics per virtual batch of 4 samples (a BatchNorm subclass with its own forward)."""

    def forward(self, x):
        return torch.cat([F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps)
                          for c in x.split(4)])


def test_batchnorm_subclass_with_own_forward_is_never_modelled_as_whole_batch_bn():
    """The coupled path models torch's whole-batch BN; a subclass with its own forward (ghost BN) must
    take the general engine (with the warning), giving the loop's numbers, never whole-batch ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), _VirtualBatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 6 * 6, 5)).double()
    x, y = torch.randn(11, 1, 8, 8, dtype=torch.float64), torch.arange(11) % 5
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    with pytest.warns(ExactFallbackWarning, match="overrides BatchNorm's forward"):
        got = exact_per_sample_grad_norms(model, loss, x, y, backend="reference")
    want = reference(model, loss, x, y, mode="exact")
    assert ((got - want).abs() / want).max().item() <= 1e-10
    with pytest.raises(ValueError, match="overrides BatchNorm's forward"):
        reference(model, loss, x, y, mode="detached")
