"""metrics.roc_curve / roc_auc / tpr_at_fpr vs scikit-learn, ties included."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from bnmem_kernels import metrics
from bnmem_kernels.testing import devices


def cases():
    g = torch.Generator().manual_seed(0)
    out = []
    for n, levels in ((6, 3), (50, 5), (1001, 0), (2000, 11)):
        m = torch.rand(n, generator=g) < 0.35
        m[0], m[1] = True, False
        s = torch.randn(n, generator=g) + m.double()
        if levels:  # heavy ties, also between members and non-members
            s = (s * levels / 4).round()
        out.append((s, m))
    return out


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_roc_curve_matches_sklearn(device, dtype):
    for s, m in cases():
        fpr, tpr = metrics.roc_curve(s.to(dtype).to(device), m.to(device))
        F, T, _ = roc_curve(m.numpy(), s.to(dtype).numpy(), drop_intermediate=False)
        assert fpr.device.type == device
        np.testing.assert_allclose(fpr.cpu().numpy(), F, rtol=0, atol=1e-15)
        np.testing.assert_allclose(tpr.cpu().numpy(), T, rtol=0, atol=1e-15)


@pytest.mark.parametrize("device", devices())
def test_roc_auc_matches_sklearn_with_ties(device):
    for s, m in cases():
        got = metrics.roc_auc(s.to(device), m.to(device))
        assert abs(got - roc_auc_score(m.numpy(), s.numpy())) <= 1e-12
    # all tied: AUC 1/2; perfect separation: 1; reversed: 0
    m = torch.tensor([True, False, True, False])
    assert metrics.roc_auc(torch.zeros(4, device=device), m.to(device)) == 0.5
    assert metrics.roc_auc(m.double().to(device), m.to(device)) == 1.0
    assert metrics.roc_auc(-m.double().to(device), m.to(device)) == 0.0


@pytest.mark.parametrize("device", devices())
def test_tpr_at_fpr(device):
    for s, m in cases():
        F, T, _ = roc_curve(m.numpy(), s.numpy(), drop_intermediate=False)
        for x in (0.0, 1e-3, 1e-2, 0.1, 0.5, 1.0):
            want = T[F <= x].max()
            assert metrics.tpr_at_fpr(s.to(device), m.to(device), x) == pytest.approx(want, abs=1e-15)
    # ties straddling the FPR budget: the tied block cannot be split, so it is not counted
    s = torch.tensor([3.0, 2.0, 2.0, 1.0])
    m = torch.tensor([True, True, False, False])
    assert metrics.tpr_at_fpr(s, m, 0.4) == 0.5
    assert metrics.tpr_at_fpr(s, m, 0.5) == 1.0


def test_shapes_and_bad_inputs():
    s = torch.randn(3, 4)
    m = torch.rand(3, 4) < 0.5
    m[0, 0], m[0, 1] = True, False
    assert metrics.roc_auc(s, m) == pytest.approx(roc_auc_score(m.flatten().numpy(), s.flatten().numpy()))
    with pytest.raises(TypeError, match="is_member must be a bool"):
        metrics.roc_auc(s, m.int())
    with pytest.raises(ValueError, match="one shape"):
        metrics.roc_auc(s, m[:2])
    with pytest.raises(ValueError, match="both members and non-members"):
        metrics.roc_auc(s, torch.ones(3, 4, dtype=torch.bool))
    bad = s.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN/Inf value\(s\).*\[5\]"):
        metrics.roc_auc(bad, m)
    with pytest.raises(ValueError, match="fpr must be in"):
        metrics.tpr_at_fpr(s, m, 1.5)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        metrics.roc_auc(s.numpy(), m)


def test_backend_argument(monkeypatch):
    s, m = cases()[0]
    monkeypatch.setenv("BNMEM_BACKEND", "cpu")  # a preference among several: not consulted here
    assert metrics.roc_auc(s, m) == metrics.roc_auc(s, m, backend="reference")
    from bnmem_kernels import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="has no 'cpu' implementation"):
        metrics.roc_auc(s, m, backend="cpu")
