"""Batched membership-inference scoring: LiRA (Carlini et al. 2022) and RMIA (Zarifzadeh et al. 2024).

Definitions in docs/math.md ("LiRA and RMIA"). Every function takes `backend=None` (BNMEM_BACKEND or
auto; "cuda", "triton", "cpu" or "reference", see `bnmem_kernels._backend`). Higher score = more
likely a member. The ground truth is `bnmem_kernels.reference.lira` (a per-example numpy/scipy
loop in the style of the public LiRA code, and a vectorized fp64 PyTorch version).

Typical use, all M models as targets in turn:
    conf = lira.logit_confidence(logits, labels)            # logits [M, N, A, K] -> [M, N, A]
    s = lira.lira_scores(conf, keep)                         # keep [M, N] bool -> [M, N]
    metrics.roc_auc(s.flatten(), keep.flatten())

Where this differs from the public LiRA code (tensorflow/privacy research/mi_lira_2021/score.py):
  * every model is a target in turn and is always left out of its own Gaussian fit;
  * variance="global" is one population std per augmentation over the pooled in-values (resp.
    out-values) of all examples (without the target); the public "fixed variance" takes one std
    over everything and, offline, uses the in-values' std for the out Gaussian;
  * no 1e-30 is added to the std; the sign is flipped so higher = member (the public code negates
    at the end too); offline_stat="logpdf" is the public code's two-sided offline variant.
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

    score[t, n] fits Gaussians over the other models only: in = {m != t : keep[m, n]},
    out = {m != t : not keep[m, n]}; per augmentation a, mu = mean (center="mean") or numpy's
    median (center="median", the mean of the two middle values for an even count), sigma = the
    population std (ddof = 0) about the mean, also with the median center; variance="global"
    takes instead one sigma per augmentation over all in-values (resp. out-values) of all
    examples of the models other than t. With c = conf[t, n, a]:
      online=True:                       mean_a [log N(c; mu_in, s_in) - log N(c; mu_out, s_out)]
      online=False, offline_stat="one_sided": mean_a log Phi((c - mu_out) / s_out)
      online=False, offline_stat="logpdf":    mean_a -log N(c; mu_out, s_out)
    Each group needs 2 models (per_example) or 1 (global) besides the target: scores lacking them
    are NaN, with one RuntimeWarning giving their count (ValueError if none can be formed).
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


def rmia_scores(prob: torch.Tensor, keep: torch.Tensor, population: torch.Tensor | None = None, *,
                gamma: float = 1.0, a: float = 0.3, offline: bool = True,
                backend: str | None = None) -> torch.Tensor:
    """RMIA scores of every model as target: prob [M, N, A] in [0, 1], keep [M, N] bool -> [M, N].

    prob[m, n, a] = Pr(y_n | x_n augmented a; theta_m) (softmax probability of the label, NOT the
    logit confidence). For target t, Pr(x|theta) = mean_a prob[t, x, a] and, over the other models,
    Pr(x) = ((1 + a) mean_out(x) + (1 - a)) / 2 (offline, out-models only) or
    (mean_in(x) + mean_out(x)) / 2 (online). ratio(x) = Pr(x|theta) / Pr(x). The population
    Z_t = {z : population[z] and not keep[t, z]} (default population: all N examples, so Z_t is the
    target's non-members). score[t, x] = |{z in Z_t : ratio(x) / ratio(z) > gamma}| / |Z_t|, a
    fraction in [0, 1]. Leave-one-model-out as in lira_scores. NaN (with one warning) where the
    other models give no out-model (offline) or no in- or out-model (online).
    Backend: "reference" only (vectorized PyTorch, one sort per target + searchsorted, any device;
    BNMEM_BACKEND is not consulted, an explicit other backend raises BackendUnavailableError).
    """
    return _ls.rmia_scores(prob, keep, population, gamma=gamma, a=a, offline=offline, backend=backend)


__all__ = ["logit_confidence", "lira_scores", "rmia_scores"]
