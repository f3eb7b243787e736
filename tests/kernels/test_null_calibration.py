"""Null calibration of every membership-inference attack: confidences independent of membership.

With no signal at all, every attack must give ROC AUC 0.5 within sampling error and TPR at 1% FPR
about 0.01, at every M. Plain leave-one-model-out fits (the target's membership fixing which group
is one model smaller) fail this: online per-example AUC 0.26 at M = 6, 0.39 at 8, 0.476 at 16.
The standard error accounts for the scores of one example being correlated across targets (they
share the example's models): a DeLong variance with the placements summed per example (clustered).
"""
import warnings

import numpy as np
import pytest
import torch

from bnmem_kernels import lira, metrics
from bnmem_kernels.testing import backend_params

LIRA = {f"lira_{'online' if o else 'offline'}_{v}_{c}" + ("" if o else f"_{s}"):
        dict(online=o, variance=v, center=c, offline_stat=s)
        for o in (True, False) for v in ("per_example", "global") for c in ("mean", "median")
        for s in (("one_sided",) if o else ("one_sided", "logpdf"))}
ATTACKS = list(LIRA) + ["rmia_online", "rmia_offline"]
MS = (4, 6, 8, 16, 32)


def null_data(M, N, A, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(M, N, generator=g).argsort(0) < M // 2      # balanced: each example in M/2 models
    # independent of keep; per-model offsets as trained models have (a fixed choice of the dropped
    # model, e.g. always the highest index, is biased by them: null AUC 0.46 / 0.54 at M = 4)
    conf = torch.randn(M, 1, 1, generator=g, dtype=torch.float64) + torch.randn(M, N, A, generator=g, dtype=torch.float64)
    pop = torch.randn(M, 2000, A, generator=g, dtype=torch.float64)
    return conf, keep, pop


def clustered_auc_se(s, k):
    """AUC of scores s [M, N] for members k [M, N] and its standard error, DeLong's placements
    summed per example (column): the M scores of one example are not independent."""
    pos, neg = s[k], s[~k]
    sn, sp = torch.sort(neg).values, torch.sort(pos).values
    v10 = (torch.searchsorted(sn, s, side="left") + torch.searchsorted(sn, s, side="right")).double() / (2 * len(neg))
    v01 = 1 - (torch.searchsorted(sp, s, side="left") + torch.searchsorted(sp, s, side="right")).double() / (2 * len(pos))
    auc = float(v10[k].mean())
    c10 = torch.where(k, v10 - auc, 0.0).sum(0)   # per example
    c01 = torch.where(~k, v01 - auc, 0.0).sum(0)
    n1, n0, C = len(pos), len(neg), s.shape[1]
    var = C / (C - 1) * float((c10 / n1 + c01 / n0).pow(2).sum())
    return auc, var ** 0.5


def scores(attack, conf, keep, pop, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if attack.startswith("rmia"):
            return lira.rmia_scores(torch.sigmoid(conf), keep, torch.sigmoid(pop), offline=attack == "rmia_offline")
        return lira.lira_scores(conf, keep, backend=backend, **LIRA[attack])


def needs(attack):
    """The fewest models (balanced) the attack scores with: per-example fits need 2 per group."""
    return 6 if "per_example" in attack else 4


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("attack", ATTACKS)
def test_null_auc_and_low_fpr(attack, M):
    N = 48000 // M
    conf, keep, pop = null_data(M, N, 2, seed=M)
    if M < needs(attack):
        with pytest.raises(ValueError, match="no score can be formed"):
            scores(attack, conf, keep, pop, "reference")
        return
    s = scores(attack, conf, keep, pop, "reference")
    assert torch.isfinite(s).all()
    auc, se = clustered_auc_se(s, keep)
    assert abs(auc - 0.5) < 4 * se, f"{attack} M={M}: null AUC {auc:.4f} (se {se:.4f})"
    assert 0.001 < se < 0.012  # the SE is of the expected size (a test that can fail)
    if attack.startswith("rmia"):
        # RMIA's score is a fraction of the population: with per-model offsets many candidates' ratios
        # exceed every population ratio, so a block of scores ties at 1 spanning more than 1% FPR, and
        # the ROC's first vertex lies beyond it (tpr_at_fpr 0). Its calibration there is the ROC
        # segment through that block: TPR read on the segment at FPR 0.01.
        fpr, tpr_c = metrics.roc_curve(s.flatten(), keep.flatten())
        tpr = float(np.interp(0.01, fpr.numpy(), tpr_c.numpy()))
    else:
        tpr = metrics.tpr_at_fpr(s.flatten(), keep.flatten(), 0.01)
    # binomial SE of the TPR with one independent member draw per example (conservative)
    tol = 4 * (0.01 * 0.99 / N) ** 0.5
    if attack.startswith("rmia"):  # the score is a fraction of 2000 population ratios: coarse ties
        tol += 0.002
    assert abs(tpr - 0.01) < tol, f"{attack} M={M}: null TPR@1%FPR {tpr:.4f}, want 0.01 +- {tol:.4f}"


@pytest.mark.parametrize("backend", backend_params("cpu", ("cpu", "reference")))
@pytest.mark.parametrize("M", (6, 8))
def test_null_auc_compiled_backends(backend, M):
    """The same check on the compiled backend, at the M where the old bias was largest."""
    conf, keep, pop = null_data(M, 8000, 2, seed=100 + M)
    for attack in LIRA:
        s = scores(attack, conf, keep, pop, backend)
        auc, se = clustered_auc_se(s, keep)
        assert abs(auc - 0.5) < 4 * se, f"{attack} M={M} [{backend}]: null AUC {auc:.4f} (se {se:.4f})"


def test_clustered_se_matches_repeats():
    """The clustered SE against the spread of AUCs over independent repeats (M = 8, online)."""
    aucs, ses = [], []
    for r in range(12):
        conf, keep, pop = null_data(8, 1500, 1, seed=1000 + r)
        s = scores("lira_online_global_mean", conf, keep, pop, "reference")
        a, se = clustered_auc_se(s, keep)
        aucs.append(a)
        ses.append(se)
    ratio = np.std(aucs, ddof=1) / np.mean(ses)
    assert 0.5 < ratio < 1.7, ratio
    assert abs(clustered_auc_se(s, keep)[0] - metrics.roc_auc(s.flatten(), keep.flatten())) < 1e-12
