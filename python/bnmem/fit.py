"""Matched fit: every variant trains until the same fit criterion, so that differences in
memorization and leakage are not just differences in how far the models fit their training set.

Criterion: eval-mode accuracy (running / fixed statistics, as the attacks query) on the model's
in-distribution training (IN) candidates >= `fit_target`, checked at the end of every epoch.

Rule for the per-model step budget (config `fit_target`, `fit_max_epochs`, `fit_extend_lr`):
- training follows the usual one-cycle schedule over `epochs` epochs and stops at the end of the
  first epoch whose criterion is met (a model that fits fast trains fewer epochs);
- a model that has not met it at the end of the schedule continues in whole epochs at the constant
  learning rate lr * fit_extend_lr (same momentum, weight decay, batch order stream) until it meets
  it or reaches `fit_max_epochs` epochs in all (then it stops unmatched; the report says how many);
- fit_target = 0 turns the protocol off: every model trains exactly `epochs` epochs (equal epochs).
The canaries' fit is not part of the criterion (three of the four kinds can only be memorized:
their fit is what the study measures).

`summary` (score stage) gathers, per variant, the epochs used, the criterion's value reached and
whether it was met, with the eval-mode fit P[correct | in] per group and the train-test gap from
the score stage's memorization numbers.
"""
from __future__ import annotations

import numpy as np
import torch


def eval_accuracy(model, x, y, device, chunk: int = 2048) -> float:
    """Eval-mode accuracy of the model on (x, y); the model's training flags are put back."""
    if len(y) == 0:
        return float("nan")
    flags = [m.training for m in model.modules()]
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for s in range(0, len(y), chunk):
                out = model(x[s:s + chunk].to(device))
                correct += int((out.argmax(1).cpu() == y[s:s + chunk]).sum())
    finally:
        for m, f in zip(model.modules(), flags):
            m.training = f
    return correct / len(y)


def stop(cfg, epoch: int, fit_value: float) -> bool:
    """After epoch `epoch` (0-based) with criterion value fit_value: stop training now?"""
    if cfg.fit_target <= 0:
        return False            # equal epochs: the loop runs exactly cfg.epochs
    return fit_value >= cfg.fit_target


def summary(traces, memorization: dict, test_acc) -> dict:
    """Per-variant matched-fit numbers: traces (the models' .npz), memorization = the score stage's
    eval-mode {group: {"p_in", "p_out", ...}}, test_acc [M]."""
    epochs = [int(t["epochs_trained"]) if "epochs_trained" in t else len(t["train_acc"]) for t in traces]
    fits = [float(t["fit_history"][-1]) if "fit_history" in t and len(t["fit_history"]) else float("nan")
            for t in traces]
    target = float(traces[0]["fit_target"]) if traces and "fit_target" in traces[0] else 0.0
    p_in = {g: float(r["p_in"]) for g, r in memorization.items()}
    p_out = {g: float(r["p_out"]) for g, r in memorization.items()}
    ta = float(np.mean(test_acc)) if len(test_acc) else float("nan")
    return dict(target=target, epochs_mean=float(np.mean(epochs)), epochs_min=int(min(epochs)),
                epochs_max=int(max(epochs)), criterion_mean=float(np.nanmean(fits)),
                criterion_min=float(np.nanmin(fits)), met=int(sum(f >= target for f in fits)) if target > 0 else None,
                models=len(traces), p_in=p_in, p_out=p_out, test_acc=ta,
                train_test_gap=p_in.get("in_dist", float("nan")) - ta)
