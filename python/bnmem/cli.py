"""The `bnmem` command: run the three studies (memorization, gradient-norm influence, membership
inference) on models differing only in their normalization layer, and report them."""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import BnmemError


def _csv(s):
    return [t.strip() for t in s.split(",") if t.strip()]


def _canary_counts(s):
    """'mislabeled=50,noise=20' or a single integer for every kind."""
    from .config import CANARY_KINDS
    try:
        if "=" not in s:
            return {k: int(s) for k in CANARY_KINDS}
        out = {}
        for part in _csv(s):
            k, v = part.split("=")
            out[k.strip()] = int(v)
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"--canaries wants N or kind=N,... (kinds {', '.join(CANARY_KINDS)}), got {s!r}")


def build_parser():
    p = argparse.ArgumentParser(prog="bnmem", description=__doc__)
    p.add_argument("--version", action="version", version=f"bnmem {__version__}")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("info", help="versions and available kernel backends")
    r = sub.add_parser("run", help="run (or resume) the experiment suite into --out DIR",
                       description="Stages data -> train -> probe -> score -> report, resumable.")
    r.add_argument("--out", default="bnmem-run", help="run folder (default: ./bnmem-run)")
    r.add_argument("--config", help="TOML file with config keys (top level or a [bnmem] table)")
    r.add_argument("--quick", action="store_true", help="< 1 minute smoke run (small pool, 4 models, 3 variants)")
    r.add_argument("--dataset", help="mnist (default, embedded) | digits | cifar10 | cifar100 "
                   "(cifar: needs --data-dir)")
    r.add_argument("--data-dir", dest="data_dir", help="folder of the CIFAR-10/100 python batches")
    r.add_argument("--variants", type=_csv, help="comma list of bn,gn,ln,none,bn-frozen,bn-population")
    r.add_argument("--arch", help="cnn | mlp | resnet8 | resnet18")
    r.add_argument("--device", help="cpu (default) | cuda | auto; cuda trains with mixed precision")
    r.add_argument("--augment", action="store_const", const=True, help="training augmentation: crop (pad 4) + flip")
    r.add_argument("--query-flips", dest="query_flips", action="store_const", const=True,
                   help="LiRA query augmentations flip x shifts (default: shifts only)")
    r.add_argument("--models", type=int, help="shadow models per variant (even, >= 4)")
    r.add_argument("--epochs", type=int)
    r.add_argument("--n-in", dest="n_in", type=int, help="in-distribution candidates")
    r.add_argument("--n-test", dest="n_test", type=int)
    r.add_argument("--canaries", type=_canary_counts, help="N per kind, or kind=N,... "
                   "(mislabeled, other_domain, noise, near_ood)")
    r.add_argument("--image-size", dest="image_size", type=int, help="resize side (0 = native)")
    r.add_argument("--width", type=int)
    r.add_argument("--batch-size", dest="batch_size", type=int)
    r.add_argument("--lr", type=float)
    r.add_argument("--fit-target", dest="fit_target", type=float, help="matched fit: train each model until "
                   "eval-mode accuracy on its in-distribution training candidates >= this (default 0.99); "
                   "0 = equal epochs")
    r.add_argument("--fit-max-epochs", dest="fit_max_epochs", type=int, help="matched fit: epoch cap per model")
    r.add_argument("--influence-points", dest="influence_points", type=int,
                   help="sampled steps per model with leave-one-out influence + exact norms (0 = off)")
    r.add_argument("--attacks", type=_csv, help="auto or a comma list of lira_online, lira_online_global, "
                   "lira_offline, lira_offline_global, rmia")
    r.add_argument("--bootstrap", type=int, help="bootstrap resamples for confidence intervals")
    r.add_argument("--seed", type=int)
    r.add_argument("--workers", type=int, help="training processes (default: all cores)")
    r.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")
    r.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local worker processes (default) or Ray tasks (pip install 'bnmem[ray]')")
    r.add_argument("--ray-address", dest="ray_address", help="Ray cluster to join (auto, ray://HEAD:10001); "
                   "default: start a local Ray instance")
    from .mitigate import add_parser as add_mitigate_parser
    add_mitigate_parser(sub)
    rep = sub.add_parser("report", help="re-render the report of a run folder")
    rep.add_argument("dir")
    return p


OVERRIDE_KEYS = ("dataset", "data_dir", "variants", "arch", "models", "epochs", "n_in", "n_test", "canaries",
                 "image_size", "width", "batch_size", "lr", "attacks", "bootstrap", "seed", "workers", "progress",
                 "device", "augment", "query_flips", "fit_target", "fit_max_epochs", "influence_points")


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "info"):
        from bnmem_kernels import info

        print(f"bnmem {__version__}")
        info.main()
        return 0
    if args.command == "run":
        import time

        from .config import build_config
        from .pipeline import run
        cfg = build_config(quick=args.quick, toml_path=args.config,
                           overrides={k: getattr(args, k) for k in OVERRIDE_KEYS})
        t0 = time.perf_counter()
        from .ray_executor import make_pool
        rf = run(cfg, args.out, pool=make_pool(args.executor, workers=cfg.workers, ray_address=args.ray_address))
        print(f"bnmem run finished in {time.perf_counter() - t0:.1f} s: {rf.path('report.md')}")
        return 0
    if args.command == "mitigate":
        from .mitigate import main as mitigate_main
        return mitigate_main(args)
    if args.command == "report":
        from . import report
        from .runfolder import RunFolder
        rf = RunFolder(args.dir)
        man = rf.manifest()
        if "score" not in man.get("stages", {}):
            raise BnmemError(f"{rf.root} has no scores yet (stages done: {', '.join(man.get('stages', {})) or 'none'}); "
                             "finish it with `bnmem run --out DIR` and the same config")
        with rf.locked():
            inputs = [f for f in ("data.npz", "data.json", "scores.npz", "results.json") if f in rf.recorded()]
            bad = rf.verify(inputs)
            if bad:
                raise BnmemError(f"{rf.root}: " + "; ".join(f"{k} is {v}" for k, v in sorted(bad.items()))
                                 + "; rerun `bnmem run --out DIR` with the same config to redo it")
            report.render(rf.root)
        print(rf.path("report.md"))
        return 0
    return 0


def main(argv=None) -> int:
    try:
        return _main(argv)
    except BnmemError as exc:
        print(f"bnmem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bnmem: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:   # the kernel library installed without the suite's extra
        if (exc.name or "").split(".")[0] not in ("matplotlib", "mlxtend", "sklearn", "PIL", "scipy", "tqdm"):
            raise
        print(f"bnmem: error: the experiment suite needs {exc.name!r}: pip install -e '.[suite]' "
              "(or pip install 'bnmem[suite]')", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
