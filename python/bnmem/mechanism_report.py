"""report.md sections for issue 18: matched fit, per-step influence, mechanism arms.

Rendered from results.json only (report.py calls `markdown`); every sentence comes from the numbers.
"""
from __future__ import annotations

import numpy as np


def _f(x, nd=3):
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def _ci(c, nd=2):
    if not c or any(v is None or not np.isfinite(v) for v in c):
        return ""
    return f" [{c[0]:.{nd}f}, {c[1]:.{nd}f}]"


def _cell(entry, key, nd=2):
    e = (entry or {}).get(key)
    return "n/a" if not e else f"{_f(e['value'], nd)}{_ci(e['ci'], nd)}"


def markdown(res) -> list:
    variants = list(res["variants"])
    cfg = res["config"]
    L = []
    A = L.append
    fits = {v: res["variants"][v].get("fit") for v in variants}
    if any(fits.values()):
        target = next(f["target"] for f in fits.values() if f)
        A("## Fit: matched-fit protocol and eval-mode fit per group\n")
        if target > 0:
            A(f"Matched fit (fit.py): every model follows the one-cycle schedule over {cfg['epochs']} epochs and stops "
              f"at the end of the first epoch where its eval-mode accuracy on its in-distribution training candidates "
              f"is >= {target:g}; a model short of it after the schedule continues at the constant learning rate "
              f"lr x {cfg.get('fit_extend_lr', 0.1):g} up to {cfg.get('fit_max_epochs')} epochs in all. The headline "
              "and every comparison above are at this matched fit; equal epochs: rerun with `--fit-target 0`.\n")
        else:
            A(f"Equal epochs ({cfg['epochs']} per model; matched fit off: `--fit-target 0`).\n")
        A("| variant | epochs (mean, min-max) | fit criterion reached (mean, min) | models meeting it | "
          "P[correct \\| in] in-dist | P[correct \\| in] OOD | test acc | train-test gap (in-dist) |")
        A("|---|---|---|---|---|---|---|---|")
        for v in variants:
            f = fits[v]
            if not f:
                continue
            met = "n/a" if f["met"] is None else f"{f['met']} of {f['models']}"
            A(f"| {v} | {f['epochs_mean']:.1f} ({f['epochs_min']}-{f['epochs_max']}) | {_f(f['criterion_mean'])} "
              f"({_f(f['criterion_min'])}) | {met} | {_f(f['p_in'].get('in_dist'))} | {_f(f['p_in'].get('ood'))} | "
              f"{_f(f['test_acc'])} | {_f(f['train_test_gap'])} |")
        A("")
        got = {v: f["criterion_mean"] for v, f in fits.items() if f}
        spread = max(got.values()) - min(got.values())
        short = [f"{v} ({f['models'] - f['met']} of {f['models']})" for v, f in fits.items()
                 if f and f["met"] is not None and f["met"] < f["models"]]
        if target > 0:
            A(f"Fit reached: {min(got, key=got.get)} {min(got.values()):.3f} to {max(got, key=got.get)} "
              f"{max(got.values()):.3f} (spread {spread:.3f}); "
              + ("every model met the criterion." if not short else
                 "models stopped at the epoch cap short of the criterion: " + ", ".join(short)
                 + " — at this spread the fit is " + ("matched within 0.01." if spread <= 0.01 else
                                                      "NOT matched: differences between these variants may still "
                                                      "come from how far they fit; raise --fit-max-epochs."))
              + "\n")
    infl = {v: res["variants"][v].get("influence") or {} for v in variants}
    rec = [v for v in variants if infl[v].get("recorded")]
    if rec:
        i0 = infl[rec[0]]
        A("## Per-step influence on the actual training batches (leave-one-out)\n")
        pts = [n for v in rec for n in infl[v]['points_per_model']]
        A(f"At {min(pts)}-{max(pts)}"
          f" sampled steps per model, spread over its training, on the step's own batch (up to {i0['batch_size']} "
          "samples), before the step: infl_i = ||grad L(X) - grad L(X without i)|| (`bnmem_kernels.loo_influence`, "
          "BN statistics recomputed on each reduced batch) and the per-sample gradient norm ||g_i|| "
          "(`bnmem_kernels.per_sample_grad_norms`, mode exact; eval where BN uses fixed statistics). Amplification "
          "= infl_i / (||g_i - gbar|| / (B - 1)): 1 without batch coupling (a check), what the coupling adds "
          "otherwise. Means pool every recorded sample; 95% bootstrap intervals over models (paired across "
          "variants). Phases: thirds of each model's steps.\n")
        A("| variant | influence OOD / in-dist | early | middle | late | grad-norm OOD / in-dist (same samples) | "
          "amplification in-dist | amplification OOD | amplification OOD / in-dist |")
        A("|---|---|---|---|---|---|---|---|---|")
        for v in rec:
            p = infl[v]["phases"]
            A(f"| {v} | {_cell(p['all'], 'ratio/ood')} | {_cell(p.get('early'), 'ratio/ood')} | "
              f"{_cell(p.get('middle'), 'ratio/ood')} | {_cell(p.get('late'), 'ratio/ood')} | "
              f"{_cell(p['all'], 'norm_ratio/ood')} | {_cell(p['all'], 'amp/in_dist', 3)} | "
              f"{_cell(p['all'], 'amp/ood', 3)} | {_cell(p['all'], 'amp_ratio/ood', 3)} |")
        A("")
        tim = res.get("timings", {}).get("influence", {})
        kern = sum(tim.get(v, {}).get("kernel_seconds", 0.0) for v in rec)
        extra = sum(tim.get(v, {}).get("extra_seconds", 0.0) for v in rec)
        train = sum(tim.get(v, {}).get("train_seconds", 0.0) for v in rec)
        if train > 0:
            A(f"Cost: bnmem_kernels (loo_influence + exact norms) {kern:.1f} s, the inner products <g_i, gbar> "
              f"(float64 double backward, step_influence.py) {extra:.1f} s, of {train:.1f} s of model training "
              f"in all (summed over models): kernels {100 * kern / train:.0f}% of the training time.\n")
    comps = res.get("comparisons", {})
    pairs = [p for p in ("bn - bn-frozen", "bn - bn-population", "bn - gn", "bn - ln", "bn - none") if p in comps]
    if pairs:
        A("## Is it the coupling? BN against its arms without per-batch coupling\n")
        A("bn-frozen: running statistics after the warm-up; bn-population: statistics of the whole training pool, "
          "recomputed every epoch (same reparametrization, no per-batch coupling). Paired differences (first − "
          "second), 95% bootstrap CI; ▲ higher with bn, ▼ lower, ≈ interval includes 0:\n")
        keys = [("eval/overall/auc", "MIA AUC"), ("eval/ood/auc", "MIA AUC on OOD"), ("eval/mem/ood", "mem OOD"),
                ("infl/all/ratio/ood", "influence OOD / in-dist"), ("infl/late/ratio/ood", "influence ratio, late"),
                ("infl/all/amp/ood", "amplification OOD"), ("infl/all/amp_ratio/ood", "amplification OOD / in-dist")]
        A("| statistic | " + " | ".join(pairs) + " |")
        A("|---|" + "---|" * len(pairs))
        for key, name in keys:
            cells = []
            for p in pairs:
                r = comps[p].get(key)
                if r is None or r["a"] is None or not np.isfinite(r["diff"]):
                    cells.append("n/a")
                    continue
                mark = {"higher": "▲", "lower": "▼"}.get(r["verdict"], "≈")
                cells.append(f"{mark} {r['diff']:+.3f}{_ci(r['ci'], 3)}")
            A(f"| {name} | " + " | ".join(cells) + " |")
        A("")
    return L
