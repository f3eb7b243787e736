"""The autograd-loop reference itself: internal consistency checks (it is the ground truth)."""
import pytest
import torch
import torch.nn as nn

from bnmem_kernels.reference import per_sample_grad_norms as ref


def _ce(o, t):
    return nn.functional.cross_entropy(o, t, reduction="none")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(64, 5)).double()


def test_bias_before_bn_has_zero_exact_gradient():
    m = _model()
    x, y = torch.randn(5, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (5,))
    _, pl = ref(m, _ce, x, y, mode="exact", per_layer=True)
    assert pl["0.bias"].abs().max() < 1e-12
    _, pl = ref(m, _ce, x, y, mode="detached", per_layer=True)
    assert pl["0.bias"].abs().min() > 1e-6


def test_eval_and_detached_equal_without_bn():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 2, (4,))
    r = [ref(m, _ce, x, y, mode=md) for md in ("exact", "column", "detached", "eval")]
    for v in r[1:]:
        torch.testing.assert_close(v, r[0], rtol=1e-12, atol=0)
    # Linear per-sample gradient: by hand
    w = [torch.autograd.grad(_ce(m(x[i:i + 1]), y[i:i + 1]).sum(), list(m.parameters())) for i in range(4)]
    hand = torch.stack([sum(g.square().sum() for g in gi).sqrt() for gi in w])
    torch.testing.assert_close(r[0], hand, rtol=1e-12, atol=0)


def test_model_left_unchanged():
    m = _model()
    m.eval()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = torch.randn(3, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (3,))
    for md in ("exact", "column", "detached", "eval"):
        ref(m, _ce, x, y, mode=md)
    assert not m.training and all(not mm.training for mm in m.modules())
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert all(p.grad is None for p in m.parameters())
    assert all(len(mm._forward_hooks) == 0 for mm in m.modules())


@pytest.mark.parametrize("bad,msg", [("mode", "mode must be one of"), ("nan", "NaN"), ("inf", "Inf"),
                                     ("empty", "empty batch"), ("loss", "shape"), ("chunk", "max_chunk")])
def test_errors(bad, msg):
    m = _model()
    x, y = torch.randn(3, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (3,))
    kw = {}
    lf = _ce
    if bad == "mode":
        kw["mode"] = "bogus"
    elif bad == "nan":
        x[1, 0, 0, 0] = float("nan")
    elif bad == "inf":
        x[2, 0, 0, 0] = float("inf")
    elif bad == "empty":
        x, y = x[:0], y[:0]
    elif bad == "loss":
        def lf(o, t):
            return _ce(o, t).mean()
    elif bad == "chunk":
        kw["max_chunk"] = 0
    with pytest.raises(ValueError, match=msg):
        ref(m, lf, x, y, **kw)
