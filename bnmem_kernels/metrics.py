"""ROC metrics on the scores' device: a sort and cumulative sums (plain PyTorch).

Same points as sklearn.metrics.roc_curve(y, scores, drop_intermediate=False): one point per
distinct score (descending thresholds), preceded by (0, 0) (sklearn's threshold = inf point).
`backend`: None or "reference" (the only implementation, plain PyTorch on any device; the
BNMEM_BACKEND variable is not consulted, an explicit other backend raises).
roc_auc is the trapezoidal area under those points, equal to sklearn.metrics.roc_auc_score
(ties between a member and a non-member count 1/2). Higher score = predicted member.
"""
from __future__ import annotations

import torch

from . import _backend


def _check(scores, is_member):
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not isinstance(is_member, torch.Tensor):
        raise TypeError(f"is_member must be a bool torch.Tensor, got {type(is_member).__name__}")
    if is_member.dtype != torch.bool:
        raise TypeError(f"is_member must be a bool tensor, got {is_member.dtype}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"scores must be real numbers, got {scores.dtype}")
    if scores.shape != is_member.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and is_member {tuple(is_member.shape)} must have one shape")
    s = scores.reshape(-1).double()
    m = is_member.reshape(-1).to(s.device)
    bad = ~torch.isfinite(s)
    if bool(bad.any()):
        raise ValueError(f"scores has {int(bad.sum())} NaN/Inf value(s) (first at flat indices "
                         f"{bad.nonzero().flatten()[:5].tolist()}); drop them (e.g. unscorable LiRA "
                         f"examples) with a mask on both scores and is_member")
    n_pos = int(m.sum())
    if n_pos == 0 or n_pos == m.numel():
        raise ValueError(f"is_member must hold both members and non-members, got {n_pos} members of {m.numel()}")
    return s, m


def roc_curve(scores: torch.Tensor, is_member: torch.Tensor, *, backend: str | None = None):
    """(fpr, tpr), fp64 tensors on the scores' device, as sklearn's roc_curve(drop_intermediate=False)."""
    if backend is not None:  # one implementation; BNMEM_BACKEND (a preference among several) is not consulted
        _backend.select_backend("roc_curve", scores.device, backend, ("reference",))
    s, m = _check(scores, is_member)
    order = torch.argsort(s, descending=True, stable=True)
    s, m = s[order], m[order]
    tps = torch.cumsum(m.double(), 0)
    fps = torch.cumsum((~m).double(), 0)
    last = torch.ones_like(m)
    last[:-1] = s[1:] != s[:-1]  # the last index of each run of equal scores
    zero = s.new_zeros(1)
    tps, fps = torch.cat([zero, tps[last]]), torch.cat([zero, fps[last]])
    return fps / fps[-1], tps / tps[-1]


_backend.register("roc_curve", {"reference": roc_curve})


def roc_auc(scores: torch.Tensor, is_member: torch.Tensor, *, backend: str | None = None) -> float:
    """Area under the ROC curve (ties count 1/2), equal to sklearn.metrics.roc_auc_score."""
    fpr, tpr = roc_curve(scores, is_member, backend=backend)
    return float(torch.trapezoid(tpr, fpr))


def tpr_at_fpr(scores: torch.Tensor, is_member: torch.Tensor, fpr: float, *, backend: str | None = None) -> float:
    """The largest TPR over the ROC points with FPR <= fpr (0.0 if only the origin qualifies)."""
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    f, t = roc_curve(scores, is_member, backend=backend)
    return float(t[f <= fpr].max())


__all__ = ["roc_auc", "roc_curve", "tpr_at_fpr"]
