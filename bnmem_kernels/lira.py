"""Batched membership-inference scoring: LiRA (Carlini et al. 2022) and RMIA (Zarifzadeh et al. 2024).

Definitions in docs/math.md ("LiRA and RMIA"). Every function takes `backend=None` (BNMEM_BACKEND or
auto; "cuda", "triton", "cpu" or "reference", see `bnmem_kernels._backend`). Higher score = more
likely a member. The ground truth is `bnmem_kernels.reference.lira` (a per-example numpy/scipy
loop in the style of the public LiRA code, and a vectorized fp64 PyTorch version).

Typical use, all M models as targets in turn:
    conf = lira.logit_confidence(logits, labels)            # logits [M, N, A, K] -> [M, N, A]
    s = lira.lira_scores(conf, keep)                         # keep [M, N] bool -> [M, N]
    metrics.roc_auc(s.flatten(), keep.flatten())

Where this differs from the public LiRA code (tensorflow/privacy research/mi_lira_2021: its
score.py only computes the logit confidence; the Gaussian fits are in plot.py, generate_ours
(online) and generate_ours_offline):
  * every model is a target in turn and is always left out of its own Gaussian fit; each group
    also loses one model so that every target is fitted on n_in - 1 in- and n_out - 1 out-models
    whatever its own membership (the target where it is in the group, else the member at
    reference.lira.drop_position(n, size), a fixed hash of n). Plain leave-one-model-out scores
    members below chance with no signal (null AUC 0.39 at M = 8); the public code has no such
    bias (one separate target; every example's lists cut to one length per group);
  * variance="global" is one population std per augmentation over the pooled in-values (resp.
    out-values) of all examples (without the target), each group its own; the public online
    generate_ours with fixed variance uses the in-values' std for BOTH Gaussians;
  * center: the public code centres on the median; our default is the mean (center="mean"),
    whose leave-one-out update is O(1) and which is the Gaussian's maximum-likelihood centre
    (the median, more robust to outlying models, is center="median", exact and O(M log M));
  * no 1e-30 is added to the std; the sign is flipped so higher = member (the public code negates
    at the end too); offline_stat="logpdf" is the public code's two-sided offline variant.
RMIA's population (rmia_scores pop_prob) is data no model trained on, queried by every model, as
in the paper's code (Zarifzadeh et al.) where the population z is separate data; Pr(z) averages
all models other than the target (Privacy Meter's choice of the R largest of 2R reference
probabilities is not followed).
"""
from __future__ import annotations

import torch

from .ops import lira_scores as _ls
from .ops import logit_confidence as _lc


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """c = z_y - logsumexp_{k != y} z_k = log(p_y / (1 - p_y)): logits [..., K], labels [...] -> [...].

    One pass over K (online max and sum of exponentials excluding the label), finite for logits
    like [1000, -1000, 0]. fp16/bf16/fp32 logits accumulate in and return fp32; fp64 gives fp64.
    K >= 2; labels integer in [0, K).
    """
    return _lc.logit_confidence(logits, labels, backend=backend)


def lira_scores(conf: torch.Tensor, keep: torch.Tensor, *, online: bool = True,
                variance: str = "per_example", center: str = "mean", offline_stat: str = "one_sided",
                backend: str | None = None) -> torch.Tensor:
    """LiRA scores of every model as target: conf [M, N, A], keep [M, N] bool -> score [M, N].

    score[t, n] fits Gaussians over the other models only: in = {m : keep[m, n]} and
    out = {m : not keep[m, n]}, each group losing one model: t where t belongs to it, else its
    member at position reference.lira.drop_position(n, size) in model-index order (a fixed hash
    of n, spreading the dropped model over the models). Every target is thus fitted on n_in - 1
    in- and n_out - 1 out-models (M/2 - 1 each on balanced masks: the larger group drops one),
    which keeps the scores calibrated with no signal (null AUC 0.5); per augmentation a, mu = mean (center="mean") or numpy's
    median (center="median", the mean of the two middle values for an even count), sigma = the
    population std (ddof = 0) about the mean, also with the median center; variance="global"
    takes instead one sigma per augmentation over all in-values (resp. out-values) of all
    examples of the models other than t. With c = conf[t, n, a]:
      online=True:                       mean_a [log N(c; mu_in, s_in) - log N(c; mu_out, s_out)]
      online=False, offline_stat="one_sided": mean_a log Phi((c - mu_out) / s_out)
      online=False, offline_stat="logpdf":    mean_a -log N(c; mu_out, s_out)
    Each fit needs 2 models (per_example) or 1 (global) after the drop, i.e. n_in, n_out >= 3
    (resp. 2): scores lacking them are NaN, with one RuntimeWarning giving their count (ValueError if none can be formed).
    M >= 2; conf finite (ValueError naming how many and where otherwise); keep bool (TypeError).
    A group whose values all coincide has zero spread: its scores are not finite, with a
    RuntimeWarning giving their count (the public code adds 1e-30 to the std instead).
    fp64 conf gives fp64; fp32 (fp16/bf16 widened) gives fp32. Cost O(M N A) (plus O(M log M) per
    (n, a) for the median: one sort of each group, each target's leave-one-out median then read off
    the sorted middle values), memory O(M N). Backends: cpu (C++/OpenMP, fp64 arithmetic), cuda,
    triton (group statistics in fp64, log-likelihoods in the input precision), reference
    (vectorized fp64 PyTorch, any device).
    """
    return _ls.lira_scores(conf, keep, online=online, variance=variance, center=center,
                           offline_stat=offline_stat, backend=backend)


def rmia_scores(prob: torch.Tensor, keep: torch.Tensor, pop_prob: torch.Tensor, *,
                gamma: float = 1.0, a: float = 0.3, offline: bool = True,
                backend: str | None = None) -> torch.Tensor:
    """RMIA scores of every model as target: prob [M, N, A] in [0, 1], keep [M, N] bool -> [M, N].

    prob[m, n, a] = Pr(y_n | x_n augmented a; theta_m) (softmax probability of the label, NOT the
    logit confidence). For target t, Pr(x|theta) = mean_a prob[t, x, a] and, over the other models,
    Pr(x) = ((1 + a) mean_out(x) + (1 - a)) / 2 (offline, out-models only) or
    (mean_in(x) + mean_out(x)) / 2 (online), each group losing one model as in lira_scores.
    ratio(x) = Pr(x|theta) / Pr(x). The population: pop_prob [M, P, A], the same probability for P
    examples that NO model trained on (e.g. held-out test images), queried by every model; never the
    target's own non-members (choosing z by the membership labels uses the answer). Pr(z) = the
    mean over the models other than t (offline: ((1 + a) mean + (1 - a)) / 2).
    score[t, x] = |{z : ratio(x) / ratio(z) > gamma}| / P, a fraction in [0, 1]. NaN (with one
    warning) where fewer than 2 out-models (offline) or 2 in- and 2 out-models (online) exist.
    Backend: "reference" only (vectorized PyTorch, one sort per target + searchsorted, any device;
    BNMEM_BACKEND is not consulted, an explicit other backend raises BackendUnavailableError).
    """
    return _ls.rmia_scores(prob, keep, pop_prob, gamma=gamma, a=a, offline=offline, backend=backend)


__all__ = ["logit_confidence", "lira_scores", "rmia_scores"]
