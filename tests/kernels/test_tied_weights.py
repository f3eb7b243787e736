"""Hostile models at the per-sample-norm API: tied weights (one nn.Parameter used by two modules),
non-finite weights, meta-device parameters, and GradNormProbe across a later no-grad forward.

Tied weights: the per-sample gradient of a shared parameter is the SUM of its owners'
contributions, so its squared norm has a cross term that the one-pass rules (one module at a time)
cannot see; column / detached / eval and GradNormProbe refuse such a model, naming the parameter,
and mode="exact" (autograd through the whole model) stays right."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnmem_kernels as bk
from bnmem_kernels.reference import per_sample_grad_norms as ref_norms


def ce(o, t):
    return F.cross_entropy(o, t, reduction="none")


class Tied(nn.Module):
    """fc1 and fc2 share one weight matrix (like tied embeddings / decoders)."""

    def __init__(self, d=6, k=4, bn=False, tie=True):
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.norm = nn.BatchNorm1d(d) if bn else nn.Identity()
        self.fc2 = nn.Linear(d, d)
        if tie:
            self.fc2.weight = self.fc1.weight
        self.head = nn.Linear(d, k)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.norm(self.fc1(x))))))


def _data(B=5, d=6, k=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, d, generator=g, dtype=dtype), torch.randint(0, k, (B,), generator=g)


def _loop_norms(model, x, y):
    """Per-sample gradient norms by one autograd backward per sample (no BatchNorm in the model)."""
    out = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(ce(model(x[i:i + 1]), y[i:i + 1]).sum(), list(model.parameters()))
        out.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["column", "detached", "eval"])
@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn"])
def test_tied_weights_refused_by_onepass_modes(mode, bn):
    torch.manual_seed(0)
    model = Tied(bn=bn).double()
    x, y = _data()
    with pytest.raises(ValueError, match=r"'fc1\.weight' is shared with 'fc2\.weight'.*tied weights"):
        bk.per_sample_grad_norms(model, ce, x, y, mode=mode)


def test_tied_weights_refused_by_grad_norm_probe():
    torch.manual_seed(0)
    model = Tied().double()
    with pytest.raises(ValueError, match=r"fc1\.weight.*fc2\.weight.*mode='exact'"):
        bk.GradNormProbe(model, mode="column")


def test_tied_weights_exact_mode_matches_the_autograd_loop():
    """The cross term is there: exact equals a per-sample autograd loop, which differs from the sum of
    the two modules' separate squared norms (what the refused modes would have returned)."""
    torch.manual_seed(0)
    model = Tied().double()
    x, y = _data()
    want = _loop_norms(model, x, y)
    got = bk.per_sample_grad_norms(model, ce, x, y, mode="exact")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the same model with the two matrices untied (equal values, separate parameters): its column
    # norms add fc1's and fc2's squared norms separately, which is not the tied model's norm
    untied = Tied(tie=False).double()
    untied.load_state_dict({**model.state_dict(), "fc2.weight": model.fc1.weight.detach().clone()})
    sq = bk.per_sample_grad_norms(untied, ce, x, y, mode="column", per_layer=True)[1]
    no_cross = torch.sqrt(sum(v.pow(2) for v in sq.values()))
    assert (no_cross - want).abs().max() > 1e-3 * want.abs().max()


def test_untied_model_with_equal_values_is_accepted():
    model = Tied(tie=False).double()
    x, y = _data()
    got = bk.per_sample_grad_norms(model, ce, x, y, mode="column")
    torch.testing.assert_close(got, _loop_norms(model, x, y), rtol=1e-10, atol=1e-12)  # no BN: column is exact


# -- non-finite and meta-device weights ----------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "column", "detached", "eval"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_weights_are_named(mode, bad):
    torch.manual_seed(0)
    model = Tied(bn=True, tie=False).double()
    with torch.no_grad():
        model.fc2.weight[1, 2] = bad
    x, y = _data()
    kind = "NaN" if bad != bad else "Inf"
    with pytest.raises(ValueError, match=rf"parameter 'fc2\.weight' contains {kind} \(1 entries\)"):
        bk.per_sample_grad_norms(model, ce, x, y, mode=mode)


@pytest.mark.parametrize("mode", ["exact", "column"])
def test_meta_device_model_says_so(mode):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4))
    x, y = _data(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"parameter '0\.weight' \(and 5 more\) is on the meta device"):
        bk.per_sample_grad_norms(model, ce, x, y, mode=mode)


def test_meta_device_model_refused_by_grad_norm_probe():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"meta device"):
        bk.GradNormProbe(model)


# -- GradNormProbe and a later no-grad forward ----------------------------------------------------
@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_probe_keeps_its_norms_after_a_no_grad_forward(no_grad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).double()
    x, y = _data()
    with bk.GradNormProbe(model, mode="column", reduction="sum") as probe:
        ce(model(x), y).sum().backward()
        with no_grad():
            model(torch.randn(3, 6, dtype=torch.float64))   # e.g. an accuracy check inside the loop
        norms = probe.norms.clone()
    want = ref_norms(model, ce, x, y, mode="column")
    torch.testing.assert_close(norms, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(probe.norms, want, rtol=1e-9, atol=1e-12)
