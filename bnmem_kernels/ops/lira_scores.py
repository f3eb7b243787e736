"""lira_scores and rmia_scores: validation, dispatch and torch.library registration."""
from __future__ import annotations

import warnings

import torch

from .. import _backend
from .._validate import require_same, require_tensor
from ..reference import lira as ref

OP = "lira_scores"
IMPLEMENTED = ("cuda", "triton", "cpu", "reference")
RMIA_IMPLEMENTED = ("reference",)
_backend.register(OP, dict.fromkeys(IMPLEMENTED))            # the wrapper runs each backend itself
_backend.register("rmia_scores", dict.fromkeys(RMIA_IMPLEMENTED))
_VARIANCES = ("per_example", "global")
_CENTERS = ("mean", "median")
_OFFLINE_STATS = ("one_sided", "logpdf")


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake(conf, keep, global_std, online, median, logpdf):
    return conf.new_empty(conf.shape[0], conf.shape[1], dtype=out_dtype(conf.dtype))


def compiled_op():
    """torch.ops.bnmem.lira_scores (C++ CPU / CUDA), with its fake registered. Loads _C."""
    return _backend.compiled_op("lira_scores", _fake)


def _fake_global_std(conf, keep):
    return conf.new_empty(2, conf.shape[0], conf.shape[2], dtype=torch.float64)


def compiled_global_std():
    """torch.ops.bnmem.lira_global_std (C++ CPU): [2, M, A] fp64 pooled stds, as ref.global_std."""
    return _backend.compiled_op("lira_global_std", _fake_global_std)


@torch.library.custom_op("bnmem::lira_scores_triton", mutates_args=())
def lira_scores_triton(conf: torch.Tensor, keep: torch.Tensor, global_std: torch.Tensor | None,
                       online: bool, median: bool, logpdf: bool) -> torch.Tensor:
    from ..triton.lira import lira_scores_triton as kernel

    return kernel(conf, keep, global_std, online, median, logpdf)


lira_scores_triton.register_fake(_fake)


def describe_nonfinite(x: torch.Tensor, name: str, show: int = 5) -> str:
    bad = ~torch.isfinite(x)
    count = int(bad.sum())
    idx = bad.nonzero()[:show].tolist()
    return (f"{name} has {count} non-finite value(s) (NaN/Inf) of {x.numel()}, first at indices "
            f"{[tuple(i) for i in idx]}; drop or fix those models/examples first")


def check_scores_inputs(conf, keep, conf_name="conf"):
    require_tensor(conf_name, conf)
    if not isinstance(keep, torch.Tensor):
        raise TypeError(f"keep must be a torch.Tensor of dtype bool, got {type(keep).__name__}")
    if keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor [M, N] (keep[m, n]: example n in model m's "
                        f"training set), got dtype {keep.dtype}; use keep.bool() if it holds 0/1")
    require_same((conf_name, "keep"), (conf, keep), dtype=False)
    if conf.dim() != 3:
        raise ValueError(f"{conf_name} must be [M, N, A] (models, examples, augmentations), got shape "
                         f"{tuple(conf.shape)}; add a trailing axis for A = 1")
    if keep.shape != conf.shape[:2]:
        raise ValueError(f"keep must be [M, N] = {tuple(conf.shape[:2])} to match {conf_name} "
                         f"{tuple(conf.shape)}, got {tuple(keep.shape)}")
    if conf.shape[0] < 2:
        raise ValueError(f"need M >= 2 models (each target is scored against the others), got M = {conf.shape[0]}")
    if conf.shape[1] == 0 or conf.shape[2] == 0:
        raise ValueError(f"{conf_name} has no examples or no augmentations: shape {tuple(conf.shape)}")
    # conf's finiteness is checked after scoring (a NaN/Inf poisons every score of its example,
    # so a check of the [M, N] scores finds it at 1/A of the cost): see check_finite_after.


def check_finite_after(conf, score, valid, n_invalid, conf_name, what):
    """Raise for NaN/Inf in conf (any: every conf value reaches some score, its target's own or other
    targets' fits); warn for non-finite scores of valid entries (zero spread among the models).
    `score` holds NaN at every invalid entry (the caller makes sure: masked_fill), `n_invalid` of them,
    so the valid non-finite scores are counted without forming a mask."""
    if not bool(torch.isfinite(conf.sum())) and not bool(torch.isfinite(conf).all()):   # sum: one cheap read
        raise ValueError(describe_nonfinite(conf, conf_name))
    if n_invalid == 0 and bool(torch.isfinite(score.sum())):   # the usual case, one cheap read
        return
    extra = int((~torch.isfinite(score)).sum()) - n_invalid
    if extra:
        warnings.warn(f"{what}: {extra} score(s) are not finite although enough models were present: "
                      f"the models' values coincide (zero spread) for those examples", RuntimeWarning,
                      stacklevel=4)


def _warn_or_raise_invalid(valid: torch.Tensor, what: str, why: str) -> int:
    """Raise when no score can be formed; warn with the count of NaN scores otherwise. Returns that count."""
    n_bad = int((~valid).sum())
    if n_bad == valid.numel():
        raise ValueError(f"{what}: no score can be formed ({why}); every example lacks enough models")
    if n_bad:
        n_ex = int((~valid).any(0).sum())
        warnings.warn(f"{what}: {n_bad} of {valid.numel()} scores (in {n_ex} example(s)) are NaN: {why}",
                      RuntimeWarning, stacklevel=4)
    return n_bad


def lira_scores(conf, keep, *, online=True, variance="per_example", center="mean",
                offline_stat="one_sided", backend=None):
    check_scores_inputs(conf, keep)
    if variance not in _VARIANCES:
        raise ValueError(f"variance must be one of {_VARIANCES}, got {variance!r}")
    if center not in _CENTERS:
        raise ValueError(f"center must be one of {_CENTERS}, got {center!r}")
    if offline_stat not in _OFFLINE_STATS:
        raise ValueError(f"offline_stat must be one of {_OFFLINE_STATS}, got {offline_stat!r}")
    online = bool(online)
    chosen = _backend.select_backend(OP, conf.device, backend, IMPLEMENTED)
    if conf.dtype in (torch.float16, torch.bfloat16):
        conf = conf.float()  # exact widening; the kernels read fp32 or fp64
    valid = ref.valid_mask(keep, online, variance)
    if not bool(valid.any()) and not bool(torch.isfinite(conf).all()):
        raise ValueError(describe_nonfinite(conf, "conf"))  # the worse problem first
    need_in, need_out = ref.needed_counts(online, variance)
    n_invalid = _warn_or_raise_invalid(valid, "lira_scores",
                           f"fewer than {need_in} in-model(s) or {need_out} out-model(s) besides the target"
                           + (f", or fewer than {ref.MIN_POOLED} pooled values for the global std"
                              if variance == "global" else "")
                           + f" (online={online}, variance={variance!r})")
    median, logpdf = center == "median", offline_stat == "logpdf"
    if chosen == "reference":
        score = ref.lira_scores_torch(conf, keep, online=online, variance=variance, center=center,
                                      offline_stat=offline_stat).to(out_dtype(conf.dtype))
    else:
        gstd = None
        if variance == "global":
            gstd = compiled_global_std()(conf, keep) if chosen == "cpu" else ref.global_std(conf, keep)
            gstd = gstd.to(out_dtype(conf.dtype))
        if chosen == "triton":
            score = lira_scores_triton(conf, keep, gstd, online, median, logpdf)
        else:
            score = compiled_op()(conf, keep, gstd, online, median, logpdf)
    if n_invalid:
        score.masked_fill_(~valid, float("nan"))   # every backend's invalid entries NaN, whatever it wrote there
    check_finite_after(conf, score, valid, n_invalid, "conf", "lira_scores")
    return score


def rmia_scores(prob, keep, pop_prob, *, gamma=1.0, a=0.3, offline=True, backend=None):
    check_scores_inputs(prob, keep, "prob")
    if isinstance(pop_prob, torch.Tensor) and pop_prob.dtype == torch.bool:
        raise TypeError("pop_prob must be the population's probabilities [M, P, A] (examples no model "
                        "trained on, e.g. held-out test images, queried by every model), not a bool mask: "
                        "the target's own non-members are no longer used as the population")
    if pop_prob is None:
        raise TypeError("rmia_scores needs pop_prob [M, P, A]: the label probabilities of population examples "
                        "that no model trained on (e.g. held-out test images), from the same M models")
    require_tensor("pop_prob", pop_prob)
    if pop_prob.dim() != 3 or pop_prob.shape[0] != prob.shape[0] or pop_prob.shape[1] == 0 or pop_prob.shape[2] == 0:
        raise ValueError(f"pop_prob must be [M, P, A] with M = {prob.shape[0]} (the same models) and P, A >= 1, "
                         f"got {tuple(pop_prob.shape)}")
    pop_prob = pop_prob.to(prob.device)
    for name, x in (("prob", prob), ("pop_prob", pop_prob)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(describe_nonfinite(x, name))
        if bool(((x < 0) | (x > 1)).any()):
            raise ValueError(f"{name} must hold probabilities in [0, 1] (softmax p_y), got values outside; "
                             "pass torch.softmax(logits, -1).gather(-1, y) rather than logit confidences")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if not 0 <= a <= 1:
        raise ValueError(f"a must be in [0, 1], got {a}")
    if backend is not None:  # one implementation: BNMEM_BACKEND is not consulted, an explicit other raises
        _backend.select_backend("rmia_scores", prob.device, backend, RMIA_IMPLEMENTED)
    n_in = keep.to(torch.int64).sum(0)
    n_out = keep.shape[0] - n_in
    ok = n_out - 1 >= 1
    if not offline:
        ok &= n_in - 1 >= 1
    valid = ok[None, :].expand(keep.shape)
    _warn_or_raise_invalid(valid, "rmia_scores", "fewer than 2 out-models" + ("" if offline else " or 2 in-models")
                           + " (each group loses one model to the fit rule)")
    score = ref.rmia_scores_torch(prob, keep, pop_prob, gamma=gamma, a=a, offline=offline)
    return score.to(out_dtype(prob.dtype))
