"""Correctness sweep: every op x backend x dtype x shape against an fp64 reference, as ONE JSON.

Written so that its output alone lets a bug found on a GPU be fixed away from it: for each case the
op, backend, dtype, shape label, max abs error, error relative to max|ref|, the tolerance, NaN/Inf
counts in the output, and the exception if any; per op the first failing case. It keeps going after
a failure (and after an exception). The ops are the modules of bnmem_kernels/ops (each names its OP
and, where it has fewer than all, IMPLEMENTED); the backends those that `_backend` says can run on
the device. An op without a case builder here is reported ("no sweep case"), not skipped silently.

  python bench/gpu_sweep.py --device cuda --out sweep.json             # on the GPU
  TRITON_INTERPRET=1 python bench/gpu_sweep.py --device cpu --tiny --out sweep.json   # dry run here
  options: --ops a,b  --backends cuda,triton  --dtypes fp32,bf16  --tiny (small shapes, B in 1, 3)

The reference: the op's `reference` backend on the same inputs cast to fp64, on the CPU. Shape cases
run round-robin over the ops, so that --budget (stop starting cases after S seconds) leaves every op
covered. Exit status 0 when every case ran and passed, 1 when any failed, 3 when none failed but the
budget stopped the sweep early.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time
import traceback
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bnmem_kernels import _backend  # noqa: E402

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# error / max|ref| allowed; fp32 covers tf32-free Triton dots ("ieee") and summation-order differences
TOL = {"fp64": 1e-9, "fp32": 2e-4, "bf16": 3e-2, "fp16": 5e-3}
EXCLUDED_OPS = {"bn_seeded_backward": "being removed as dead code"}


def _rand(shape, gen, *, noncontig=False):
    """fp64 normal values; noncontig: a view with a doubled last dimension stepped by 2."""
    if noncontig:
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)[..., ::2]
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _batches(tiny):
    return (1, 3) if tiny else (1, 7, 256)


# Each builder yields (label, inputs: dict of fp64 CPU tensors and plain values, call(inputs, backend)).
# `call` receives the inputs already cast (floating tensors) and moved; it returns a tensor.

def cases_ghost_norm_linear(tiny, gen):
    from bnmem_kernels.ops.ghost_norm_linear import ghost_norm_linear
    dims = [(5, 8, 6)] if tiny else [(16, 64, 10), (5, 33, 7), (49, 128, 100)]
    for B in _batches(tiny):
        for T, din, dout in dims:
            for route in ("gram", "materialize"):
                for nc in (False, True):
                    a, g = _rand((B, T, din), gen, noncontig=nc), _rand((B, T, dout), gen)
                    yield (f"B={B} T={T} din={din} dout={dout} route={route}{' noncontig' if nc else ''}",
                           {"a": a, "g": g},
                           lambda t, be, route=route: ghost_norm_linear(t["a"], t["g"], route=route, backend=be))


def cases_conv_weight_grad_sq(tiny, gen):
    from bnmem_kernels.ops.conv_weight_grad_sq import conv_weight_grad_sq
    confs = [(3, 4, 6, 3, 1, 1, 1)] if tiny else [(3, 16, 16, 3, 1, 1, 1), (5, 7, 11, 3, 2, 1, 1),
                                                   (8, 8, 12, 3, 1, 2, 2)]
    for B in _batches(tiny):
        for C, Co, H, k, s, d, grp in confs:
            OH = (H - d * (k - 1) - 1) // s + 1
            for nc in (False, True):
                x, g = _rand((B, C, H, H), gen, noncontig=nc), _rand((B, Co, OH, OH), gen)
                yield (f"B={B} C={C} Co={Co} H={H} k={k} s={s} d={d} g={grp}{' noncontig' if nc else ''}",
                       {"x": x, "g": g},
                       lambda t, be, k=k, s=s, d=d, grp=grp: conv_weight_grad_sq(t["x"], t["g"], k, s, d, grp,
                                                                                backend=be))


def cases_norm_affine_grad_sq(tiny, gen):
    from bnmem_kernels.ops.norm_affine_grad_sq import norm_affine_grad_sq
    confs = [(3, 5)] if tiny else [(16, 64), (7, 1), (33, 49), (512, 16)]
    for B in _batches(tiny):
        for C, S in confs:
            for kind in ("bn", "ln"):
                x, dy = _rand((B, C, S), gen), _rand((B, C, S), gen, noncontig=True)
                shape = (1, C, 1) if kind == "bn" else (B, 1, S)
                mean, rstd = _rand(shape, gen), _rand(shape, gen).abs() + 0.5
                yield (f"B={B} C={C} S={S} stats={kind} dy noncontig", {"x": x, "dy": dy, "mean": mean, "rstd": rstd},
                       lambda t, be: norm_affine_grad_sq(t["x"], t["dy"], t["mean"], t["rstd"], backend=be))


def cases_pooled_conv_weight_grad(tiny, gen):
    from bnmem_kernels.ops.pooled_conv_weight_grad import pooled_conv_weight_grad
    confs = [(4, 6, 6, 3, 2, 1)] if tiny else [(16, 16, 18, 3, 8, 1), (5, 7, 13, 3, 3, 1), (8, 12, 10, 3, 40, 2)]
    for B in _batches(tiny):
        for C, Co, Hp, k, N, grp in confs:
            Ho = Hp - k + 1
            P = max(1, (Ho // 2) ** 2)
            for nc in (False, True):
                x = _rand((B, C, Hp, Hp), gen, noncontig=nc)
                vals = _rand((Co, N, B, P), gen)
                idx = torch.randint(0, Ho * Ho, (B, Co, P), generator=gen)
                yield (f"B={B} C={C} Co={Co} Hp={Hp} k={k} N={N} P={P} g={grp}{' noncontig' if nc else ''}",
                       {"x": x, "vals": vals, "idx": idx},
                       lambda t, be, Ho=Ho, k=k, grp=grp: pooled_conv_weight_grad(t["x"], t["vals"], t["idx"], (Ho, Ho),
                                                                                 k, 1, 1, grp, backend=be))


def cases_lira_scores(tiny, gen):
    from bnmem_kernels.ops.lira_scores import lira_scores
    confs = [(8, 5, 2)] if tiny else [(16, 257, 2), (64, 1000, 1), (7, 33, 3)]
    for M, N, A in confs:
        for online, variance, center in ((True, "per_example", "mean"), (False, "per_example", "mean"),
                                         (True, "global", "median"), (False, "per_example", "median")):
            conf = _rand((M, N, A), gen)
            keep = torch.rand(M, N, generator=gen) < 0.5
            keep[: M // 2 + 1, 0], keep[M // 2 + 1:, 0] = True, False   # column 0: both groups non-trivial
            yield (f"M={M} N={N} A={A} online={online} variance={variance} center={center}",
                   {"conf": conf, "keep": keep},
                   lambda t, be, o=online, v=variance, c=center: lira_scores(t["conf"], t["keep"], online=o,
                                                                            variance=v, center=c, backend=be))


def cases_logit_confidence(tiny, gen):
    from bnmem_kernels.ops.logit_confidence import logit_confidence
    confs = [(5, 3)] if tiny else [(256, 10), (7, 1000), (1, 2), (300, 1025)]
    for R, K in confs:
        for nc in (False, True):
            z = _rand((R, K), gen, noncontig=nc) * 5
            y = torch.randint(0, K, (R,), generator=gen)
            yield (f"R={R} K={K}{' noncontig' if nc else ''}", {"z": z, "y": y},
                   lambda t, be: logit_confidence(t["z"], t["y"], backend=be))


BUILDERS = {name[len("cases_"):]: fn for name, fn in globals().items() if name.startswith("cases_")}


def discover_ops():
    """{op: implemented backends} from bnmem_kernels/ops (or _backend's registry, once it has one)."""
    reg = getattr(_backend, "REGISTRY", None) or getattr(_backend, "registry", None)
    if isinstance(reg, dict) and reg:
        return {op: tuple(impls) for op, impls in reg.items()}
    import bnmem_kernels.ops as ops_pkg
    found = {}
    for info in pkgutil.iter_modules(ops_pkg.__path__):
        mod = importlib.import_module(f"bnmem_kernels.ops.{info.name}")
        op = getattr(mod, "OP", None)
        if op:
            found[op] = tuple(getattr(mod, "IMPLEMENTED", _backend.BACKENDS))
    return found


def _cast(inputs, dtype, device):
    return {k: (v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def _compare(out, ref, dtname):
    out64 = out.detach().to("cpu", torch.float64)
    ok_ref = torch.isfinite(ref)
    res = {"nan": int(torch.isnan(out64).sum()), "inf": int(torch.isinf(out64).sum()),
           "shape_ok": tuple(out64.shape) == tuple(ref.shape)}
    if not res["shape_ok"]:
        res.update(ok=False, why=f"shape {tuple(out64.shape)} != reference {tuple(ref.shape)}")
        return res
    # NaN where the reference is NaN (e.g. LiRA's invalid entries) is agreement; anywhere else a failure
    nan_mismatch = int((torch.isnan(out64) != torch.isnan(ref)).sum())
    diff = (out64 - ref).abs()[ok_ref & torch.isfinite(out64)]
    scale = float(ref[ok_ref].abs().max()) if ok_ref.any() else 0.0
    max_abs = float(diff.max()) if diff.numel() else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    res.update(max_abs=max_abs, rel=rel, ref_scale=scale, tol=TOL[dtname], nan_mismatch=nan_mismatch)
    res["ok"] = bool(rel <= TOL[dtname] and nan_mismatch == 0 and int(torch.isinf(out64[ok_ref]).sum()) == 0)
    if not res["ok"]:
        res["why"] = (f"rel error {rel:.3g} > tol {TOL[dtname]:g}" if rel > TOL[dtname]
                      else f"{nan_mismatch} NaN where the reference has none (or the reverse)")
    return res


def _run_case(op, label, inputs, call, report, device, dtypes, args):
    """One shape case of one op: the fp64 reference on CPU, then every backend x dtype against it."""
    summary = report["ops"][op]
    summary["cases_run"] += 1
    try:
        ref = call(_cast(inputs, torch.float64, "cpu"), "reference").to(torch.float64)
    except Exception as exc:  # noqa: BLE001 -- a reference that fails is itself a finding
        summary["failed"] += 1
        rec = {"op": op, "backend": "reference", "dtype": "fp64", "case": label, "ok": False,
               "error": f"{type(exc).__name__}: {exc}"}
        report["cases"].append(rec)
        summary["first_failure"] = summary["first_failure"] or rec
        return
    for be in summary["backends"]:
        for dtname in dtypes:
            if op in ("lira_scores",) and dtname in ("bf16", "fp16") and not args.all_dtypes:
                continue   # widened to fp32 by the op before any kernel: the fp32 case covers it
            rec = {"op": op, "backend": be, "dtype": dtname, "case": label}
            t0 = time.perf_counter()
            try:
                out = call(_cast(inputs, DTYPES[dtname], device), be)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rec.update(_compare(out, ref, dtname))
            except Exception as exc:  # noqa: BLE001 -- recorded; the sweep goes on
                rec.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000],
                           trace=traceback.format_exc(limit=4)[-1500:])
                if device.type == "cuda" and "device-side assert" in str(exc):
                    rec["note"] = "CUDA context lost: later cases on this device are unreliable"
            rec["seconds"] = round(time.perf_counter() - t0, 4)
            report["cases"].append(rec)
            key = f"{be}/{dtname}"
            if "rel" in rec:
                summary["max_rel"][key] = max(summary["max_rel"].get(key, 0.0), rec["rel"])
            if rec["ok"]:
                summary["passed"] += 1
            else:
                summary["failed"] += 1
                summary["first_failure"] = summary["first_failure"] or rec


def run(args):
    device = torch.device(args.device)
    ops = discover_ops()
    want_ops = set(args.ops.split(",")) if args.ops else None
    want_be = args.backends.split(",") if args.backends else list(_backend.BACKENDS)
    dtypes = args.dtypes.split(",")
    available = _backend.available_backends(device)
    report = {"device": str(device), "torch": torch.__version__, "tiny": args.tiny,
              "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
              "triton_interpret": _backend.triton_interpreting(), "available_backends": available,
              "unavailable": {b: _backend.unavailable_reason(b, device) for b in _backend.BACKENDS if b not in available},
              "ops": {}, "cases": [], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t_start = time.time()
    queues = {}   # op -> its cases; run round-robin (case 1 of every op, then case 2, ...) so that a
    for op, implemented in sorted(ops.items()):   # budget cut leaves every op covered
        if want_ops and op not in want_ops:
            continue
        if op in EXCLUDED_OPS:
            report["ops"][op] = {"status": f"excluded: {EXCLUDED_OPS[op]}"}
            continue
        if op not in BUILDERS:
            report["ops"][op] = {"status": "no sweep case (add cases_<op> to bench/gpu_sweep.py)"}
            continue
        report["ops"][op] = {"implemented": list(implemented), "passed": 0, "failed": 0, "first_failure": None,
                             "backends": [b for b in want_be if b in implemented and b in available],
                             "max_rel": {}, "cases_run": 0}
        queues[op] = list(BUILDERS[op](args.tiny, torch.Generator().manual_seed(1234)))
    for k in range(max((len(q) for q in queues.values()), default=0)):
        for op, queue in queues.items():
            if k >= len(queue):
                continue
            if args.budget and time.time() - t_start > args.budget:
                report["stopped"] = f"budget of {args.budget} s reached; shape cases not run: " + ", ".join(
                    f"{o} {len(q) - report['ops'][o]['cases_run']}" for o, q in queues.items())
                break
            _run_case(op, *queue[k], report, device, dtypes, args)
        if report.get("stopped"):
            break
    report["seconds"] = round(time.time() - t_start, 1)
    report["n_cases"] = len(report["cases"])
    report["n_failed"] = sum(not c["ok"] for c in report["cases"])
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="the JSON report (default: stdout)")
    p.add_argument("--ops")
    p.add_argument("--backends")
    p.add_argument("--dtypes", default="fp64,fp32,bf16,fp16")
    p.add_argument("--all-dtypes", action="store_true", help="also bf16/fp16 for ops that widen them first")
    p.add_argument("--tiny", action="store_true", help="small shapes (dry run, sanitizer)")
    p.add_argument("--budget", type=float, default=0, help="stop starting new cases after this many seconds")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")   # NaN/Inf counts and errors are in the report; keep the console short
    report = run(args)
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, args.out)
    else:
        print(text)
    print(f"gpu_sweep: {report['n_cases']} cases, {report['n_failed']} failed, {report['seconds']} s "
          f"on {report['device']} ({', '.join(report['available_backends'])})", file=sys.stderr)
    for op, s in report["ops"].items():
        ff = s.get("first_failure")
        line = s.get("status") or f"{s['passed']} passed, {s['failed']} failed; max rel {s['max_rel']}"
        print(f"  {op}: {line}", file=sys.stderr)
        if ff:
            print(f"    first failure: {ff['backend']} {ff['dtype']} {ff['case']}: "
                  f"{ff.get('error') or ff.get('why')}", file=sys.stderr)
    if report.get("stopped"):
        print(f"  STOPPED: {report['stopped']}", file=sys.stderr)
    return 1 if report["n_failed"] else 3 if report.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(main())
