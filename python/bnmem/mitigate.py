"""Mitigation study (`bnmem mitigate`): what to do about BatchNorm's memorization and leakage.

Arms (each a normalization variant + config overrides, trained and scored by the suite's own
pipeline, with the same data, keep masks, seeds and epochs as the others):
  bn                   the baseline: BatchNorm with batch statistics
  gn, ln               swap BN for GroupNorm / LayerNorm
  bn-batch<B'>         BN with a larger batch (B' = batch_size x --batch-factor; same lr schedule)
  ghost-bn-v<V>        ghost batch norm: batch statistics over virtual batches of V (ghost_bn.py)
  bn-freeze-after-<W>  BN statistics frozen (running stats, eval-mode BN) after W warm-up epochs
  bn-eval-last-<K>     BN in eval mode for the last K epochs only
Arms sharing their config overrides share one run folder `runs/<name>/` (a normal bnmem run folder
with its own report.md), so a killed study resumes where it stopped.

Per arm, from the run folders' results.json / scores.npz (the score stage's numbers; pooled figures
use score.stratified_resamples and score.ci for the intervals, as the suite does):
  test accuracy (mean over shadow models), membership inference (primary attack, eval-mode
  queries, and batch-statistics queries for BN arms): AUC, TPR at 1% and 0.1% FPR; memorization of
  the OOD canaries (all kinds pooled) and of in-distribution candidates; the OOD / in-distribution
  ratio of the mean per-sample gradient norm over training (the step probe's norms: "column" while
  BN uses batch statistics, "eval" once it is frozen).
Writes mitigation.csv, mitigation.md (table, trade-off summary, index of runs), mitigation.png
(privacy vs test accuracy) and mitigation.json.
The arms are compared at equal training length, not tuned to equal accuracy: the table shows each
arm's accuracy next to its privacy figures (and its difference to bn) so the trade-off is read
from the same row.
"""
from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import BnmemError

GROUP_IN = 0


@dataclass(frozen=True)
class Arm:
    name: str
    variant: str
    overrides: tuple = ()          # sorted (key, value) pairs on top of the base config
    what: str = ""

    def folder(self) -> str:
        if self.variant.startswith("gbn"):
            return f"ghost-{self.variant}"
        if not self.overrides:
            return "base"
        return "-".join(f"{k}{v}" for k, v in self.overrides).replace("_", "")


@dataclass
class Study:
    arms: list
    base: object                   # Config
    extra: dict = field(default_factory=dict)


ARM_KINDS = ("bn", "gn", "ln", "batch", "ghost", "freeze", "eval-last")


def default_arms(cfg, *, kinds=ARM_KINDS, batch_factor: int = 4, virtual_batch: int | None = None,
                 freeze_after: int = 1, eval_last: int = 1) -> list:
    E, B = cfg.epochs, cfg.batch_size
    V = virtual_batch if virtual_batch is not None else max(2, B // 4)
    unknown = set(kinds) - set(ARM_KINDS)
    if unknown:
        raise BnmemError(f"unknown mitigation arm(s) {', '.join(sorted(unknown))}; choose from {', '.join(ARM_KINDS)}")
    if "bn" not in kinds:
        raise BnmemError("the mitigation study needs the bn arm (the baseline every arm is compared with)")
    if "batch" in kinds and batch_factor < 2:
        raise BnmemError(f"--batch-factor must be >= 2 (a larger batch than {B}), got {batch_factor}")
    if "ghost" in kinds and not 2 <= V < B:
        raise BnmemError(f"--virtual-batch must be in [2, batch size {B}), got {V}")
    if "freeze" in kinds and not 1 <= freeze_after < E:
        raise BnmemError(f"--freeze-after must be in [1, epochs-1 = {E - 1}] warm-up epochs, got {freeze_after}")
    if "eval-last" in kinds and not 1 <= eval_last < E:
        raise BnmemError(f"--eval-last must be in [1, epochs-1 = {E - 1}], got {eval_last}")
    arms = []
    for k in kinds:
        if k in ("bn", "gn", "ln"):
            arms.append(Arm(k, k, (), {"bn": "BatchNorm (baseline)", "gn": "GroupNorm instead of BN",
                                       "ln": "LayerNorm instead of BN"}[k]))
        elif k == "batch":
            arms.append(Arm(f"bn-batch{B * batch_factor}", "bn", (("batch_size", B * batch_factor),),
                            f"BN, batch {B * batch_factor} instead of {B}"))
        elif k == "ghost":
            # own run folder without the exact-norm schedule: bnmem_kernels' exact path treats every
            # BatchNorm subclass as whole-batch BN (wrong for ghost BN; reported to the kernels' owner)
            arms.append(Arm(f"ghost-bn-v{V}", f"gbn{V}", (("exact_models", 0),), f"ghost BN, virtual batches of {V}"))
        elif k == "freeze":
            arms.append(Arm(f"bn-freeze-after-{freeze_after}", "bn-frozen",
                            (("frozen_warmup_epochs", freeze_after),),
                            f"BN statistics frozen after {freeze_after} warm-up epoch(s)"))
        elif k == "eval-last":
            arms.append(Arm(f"bn-eval-last-{eval_last}", "bn-frozen", (("frozen_warmup_epochs", E - eval_last),),
                            f"BN in eval mode for the last {eval_last} epoch(s)"))
    return arms


def arm_configs(base, arms) -> dict:
    """folder name -> Config with the variants of every arm sharing that folder's overrides."""
    from .config import from_dict
    groups = {}
    for a in arms:
        groups.setdefault(a.folder(), (a.overrides, []))[1].append(a.variant)
    out = {}
    for name, (over, variants) in groups.items():
        d = {**base.hashed_dict(), "data_dir": base.data_dir, "workers": base.workers, "progress": base.progress}
        d.update(dict(over))
        d["variants"] = list(dict.fromkeys(variants))
        cfg = from_dict(d)
        _validate(cfg)
        out[name] = cfg
    return out


def _validate(cfg):
    """Config.validate, with ghost-BN variants (not run variants) checked here."""
    import copy

    from .ghost_bn import parse_virtual_batch
    probe = copy.deepcopy(cfg)
    try:
        probe.variants = list(dict.fromkeys("bn" if parse_virtual_batch(v) else v for v in cfg.variants))
    except ValueError as exc:
        raise BnmemError(str(exc)) from None
    probe.validate()


# -- running -------------------------------------------------------------------------------------
def run_study(base, arms, out: str, *, executor: str = "local", ray_address: str | None = None, log=print) -> dict:
    from . import pipeline
    from .ray_executor import RayPool
    from .runfolder import write_json

    if len({a.name for a in arms}) != len(arms):
        raise BnmemError("two mitigation arms have the same name")
    cfgs = arm_configs(base, arms)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    owner = RayPool(ray_address) if executor == "ray" else None
    timings = {}
    try:
        if owner is not None:
            owner.start()
        for name, cfg in cfgs.items():
            log(f"mitigate: run {name} ({', '.join(cfg.variants)})")
            t = time.perf_counter()
            pool = RayPool(ray_address) if owner is not None else None  # joins the running instance
            pipeline.run(cfg, os.path.join(out, "runs", name), log=log, pool=pool)
            timings[name] = round(time.perf_counter() - t, 2)
    finally:
        if owner is not None:
            owner.close()
    rows = collect(out, arms, base)
    study = dict(base_config=base.hashed_dict(), base_config_hash=base.hash(),
                 arms=[dict(name=a.name, variant=a.variant, overrides=dict(a.overrides), what=a.what, run=a.folder())
                       for a in arms],
                 runs={n: dict(config_hash=c.hash(), variants=c.variants) for n, c in cfgs.items()},
                 rows=rows, executor=executor, seconds=round(time.perf_counter() - t0, 2), run_seconds=timings)
    write_json(os.path.join(out, "mitigation.json"), study)
    render(out, study)
    return study


# -- collecting ----------------------------------------------------------------------------------
def _pooled(values: np.ndarray, mask: np.ndarray, boots, group) -> tuple:
    v = values.astype(np.float64)
    point = float(np.nanmean(v[mask])) if mask.any() else float("nan")
    return point, [float(np.nanmean(v[idx[mask[idx]]])) for idx in boots if mask[idx].any()]


def collect(out, arms, base) -> list:
    from .runfolder import read_json, read_npz
    from .score import ci, stratified_resamples
    rows = []
    for a in arms:
        root = os.path.join(out, "runs", a.folder())
        res = read_json(os.path.join(root, "results.json"))
        sc = {k.replace("__", "/"): v for k, v in read_npz(os.path.join(root, "scores.npz")).items()}
        d = read_npz(os.path.join(root, "data.npz"))
        group = d["group"]
        ood, ind = group != GROUP_IN, group == GROUP_IN
        boots = stratified_resamples(group, res["bootstrap"], res["config"]["seed"])
        vr = res["variants"][a.variant]
        primary = res["primary_attack"]
        row = dict(arm=a.name, variant=a.variant, what=a.what, run=a.folder(),
                   test_acc=float(np.mean(vr["test_acc"])), test_acc_std=float(np.std(vr["test_acc"])),
                   train_acc=float(np.mean(vr["train_acc"])), attack=primary)
        for q, suffix in (("eval", ""), ("train", "_batchstats")):
            m = vr["modes"].get(q, {}).get("attacks", {}).get(primary, {}).get("overall")
            for key in ("auc", "tpr@0.01", "tpr@0.001"):
                row[key + suffix] = m[key] if m else None
            row["tpr@0.001_ci" + suffix] = m.get("tpr@0.001_ci") if m else None
        mem = sc[f"{a.variant}/eval/mem"]
        p, vals = _pooled(mem, ood, boots, group)
        row["mem_ood"], row["mem_ood_ci"] = p, ci(vals)
        row["mem_in_dist"] = _pooled(mem, ind, [], group)[0]
        g = sc[f"{a.variant}/gradnorm_mean"].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            num, nb = _pooled(g, ood, boots, group)
            den, db = _pooled(g, ind, boots, group)
            row["gradnorm_ratio_ood"] = num / den if den else float("nan")
            row["gradnorm_ratio_ood_ci"] = ci([x / y for x, y in zip(nb, db) if y])
        rows.append(row)
    base_row = next(r for r in rows if r["arm"] == "bn")
    for r in rows:
        r["test_acc_vs_bn"] = r["test_acc"] - base_row["test_acc"]
    return rows


# -- rendering -----------------------------------------------------------------------------------
CSV_COLS = ("arm", "variant", "test_acc", "test_acc_std", "test_acc_vs_bn", "train_acc", "attack", "auc", "tpr@0.01",
            "tpr@0.001", "auc_batchstats", "tpr@0.001_batchstats", "mem_ood", "mem_in_dist", "gradnorm_ratio_ood", "what")


def _f(x, nd=3):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def _fci(c, nd=3):
    if not c or any(v is None or not np.isfinite(v) for v in c):
        return ""
    return f" [{c[0]:.{nd}f}, {c[1]:.{nd}f}]"


def table_markdown(rows) -> str:
    head = ("| arm | test acc (Δ vs bn) | AUC | TPR@0.1% FPR | TPR@0.1% (BN batch stats) | OOD memorization | "
            "in-dist memorization | OOD/in-dist grad-norm ratio |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['arm']} | {_f(r['test_acc'])} ({r['test_acc_vs_bn']:+.3f}) | {_f(r['auc'])} | "
                     f"{_f(r['tpr@0.001'])}{_fci(r['tpr@0.001_ci'])} | {_f(r['tpr@0.001_batchstats'])} | "
                     f"{_f(r['mem_ood'])}{_fci(r['mem_ood_ci'])} | {_f(r['mem_in_dist'])} | "
                     f"{_f(r['gradnorm_ratio_ood'], 2)}{_fci(r['gradnorm_ratio_ood_ci'], 2)} |")
    return "\n".join(lines) + "\n"


def render(out, study) -> None:
    from .runfolder import write_text
    rows = study["rows"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLS)
    for r in rows:
        w.writerow([f"{r[c]:.6g}" if isinstance(r[c], float) else ("" if r[c] is None else r[c]) for c in CSV_COLS])
    write_text(os.path.join(out, "mitigation.csv"), buf.getvalue())
    _plot(out, rows)
    write_text(os.path.join(out, "mitigation.md"), study_markdown(study))


def study_markdown(study) -> str:
    rows, cfg = study["rows"], study["base_config"]
    bn = next(r for r in rows if r["arm"] == "bn")
    md = ["# Mitigation study: BatchNorm's memorization and leakage vs. test accuracy", "",
          f"Base config `{study['base_config_hash']}`: {cfg['dataset']}, arch {cfg['arch']} (width {cfg['width']}), "
          f"{cfg['models']} shadow models per arm, {cfg['epochs']} epochs, batch {cfg['batch_size']}, "
          f"{cfg['n_in']} in-distribution candidates + OOD canaries {cfg['canaries']}. Membership attack: "
          f"{bn['attack']} (every shadow model as target; eval-mode queries unless stated). Intervals: 95% "
          f"percentile bootstrap over candidates ({cfg['bootstrap']} resamples). Study wall time "
          f"{study['seconds']:.0f} s ({study['executor']} executor).", "",
          "## Privacy vs. accuracy", "", table_markdown(rows), "", "![trade-off](mitigation.png)", "",
          "## What each arm changed, as measured", ""]
    for r in rows:
        if r["arm"] == "bn":
            continue
        parts = []
        for key, label in (("tpr@0.001", "TPR@0.1% FPR"), ("mem_ood", "OOD memorization"),
                           ("gradnorm_ratio_ood", "OOD/in-dist gradient-norm ratio")):
            a, b = r[key], bn[key]
            if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)):
                parts.append(f"{label} n/a")
                continue
            parts.append(f"{label} {b:.3f} → {a:.3f} ({'lower' if a < b else 'higher' if a > b else 'equal'})")
        md.append(f"- **{r['arm']}** ({r['what']}): test accuracy {bn['test_acc']:.3f} → {r['test_acc']:.3f} "
                  f"({r['test_acc_vs_bn']:+.3f}); " + "; ".join(parts) + ".")
    md += ["", "Point estimates from one study; where the intervals of two arms overlap, the table does not "
           "establish a difference. Arms are compared at equal training length, not at tuned equal accuracy.", "",
           "## Index of runs", "", "| run folder | variants | config | wall time (s) | report |", "|---|---|---|---|---|"]
    for name, r in study["runs"].items():
        md.append(f"| `runs/{name}` | {', '.join(r['variants'])} | `{r['config_hash']}` | "
                  f"{study['run_seconds'].get(name, 0):.0f} | [report](runs/{name}/report.md) |")
    return "\n".join(md) + "\n"


OTHER_COLORS = ("C0", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9")


def _plot(out, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .runfolder import save_figure
    panels = [("tpr@0.001", "TPR at 0.1% FPR"), ("mem_ood", "OOD memorization"),
              ("gradnorm_ratio_ood", "OOD / in-dist gradient norm")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (key, label) in zip(axes, panels):
        for i, r in enumerate(rows):
            y = r[key]
            if y is None or not np.isfinite(y):
                continue
            c = "tab:red" if r["arm"] == "bn" else OTHER_COLORS[i % len(OTHER_COLORS)]  # red is the baseline's
            ax.scatter(r["test_acc"], y, color=c, s=40, zorder=3)
            ci_key = key + "_ci"
            if r.get(ci_key) and all(v is not None and np.isfinite(v) for v in r[ci_key]):
                ax.vlines(r["test_acc"], r[ci_key][0], r[ci_key][1], color=c, lw=1, alpha=0.6)
            ax.annotate(r["arm"], (r["test_acc"], y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("test accuracy (mean over shadow models)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Mitigations of BatchNorm: privacy (lower is better) vs. test accuracy (higher is better)", fontsize=10)
    save_figure(fig, os.path.join(out, "mitigation.png"))
    plt.close(fig)


# -- CLI -------------------------------------------------------------------------------------------
def add_parser(sub):
    def csv_list(s):
        return [t.strip() for t in s.split(",") if t.strip()]
    p = sub.add_parser("mitigate", help="mitigation study: BN vs GN/LN, larger batch, ghost BN, frozen / eval-mode BN",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bnmem-mitigate", help="study folder (default: ./bnmem-mitigate)")
    p.add_argument("--config", help="TOML file with base config keys")
    p.add_argument("--quick", action="store_true", help="the suite's --quick base config")
    p.add_argument("--arms", type=csv_list, help=f"comma list of {','.join(ARM_KINDS)} (default: all)")
    p.add_argument("--batch-factor", dest="batch_factor", type=int, default=4, help="larger-batch arm: x this (4)")
    p.add_argument("--virtual-batch", dest="virtual_batch", type=int, help="ghost BN virtual batch (batch size / 4)")
    p.add_argument("--freeze-after", dest="freeze_after", type=int, default=1, help="warm-up epochs before freezing BN")
    p.add_argument("--eval-last", dest="eval_last", type=int, default=1, help="epochs at the end with BN in eval mode")
    for flag, kw in (("--dataset", {}), ("--data-dir", dict(dest="data_dir")), ("--arch", {}),
                     ("--models", dict(type=int)), ("--epochs", dict(type=int)), ("--n-in", dict(dest="n_in", type=int)),
                     ("--width", dict(type=int)), ("--batch-size", dict(dest="batch_size", type=int)),
                     ("--lr", dict(type=float)), ("--seed", dict(type=int)), ("--workers", dict(type=int))):
        p.add_argument(flag, **kw)
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--ray-address", dest="ray_address")
    return p


BASE_KEYS = ("dataset", "data_dir", "arch", "models", "epochs", "n_in", "width", "batch_size", "lr", "seed", "workers",
             "progress")


def main(args) -> int:
    from .config import build_config
    base = build_config(quick=args.quick, toml_path=args.config,
                        overrides={**{k: getattr(args, k) for k in BASE_KEYS}, "variants": ["bn"]})
    arms = default_arms(base, kinds=args.arms or ARM_KINDS, batch_factor=args.batch_factor,
                        virtual_batch=args.virtual_batch, freeze_after=args.freeze_after, eval_last=args.eval_last)
    study = run_study(base, arms, args.out, executor=args.executor, ray_address=args.ray_address)
    print(table_markdown(study["rows"]))
    print(f"bnmem mitigate finished in {study['seconds']:.1f} s: {os.path.join(os.path.abspath(args.out), 'mitigation.md')}")
    return 0
