"""mode="exact", path="auto" against the autograd loop on the zoo of models users bring
(bnmem_kernels.testing.ZOO) x batch sizes: speed-up over the loop, peak memory over one plain
forward+backward, the engine auto settled on and why. Writes bench/results/exact_zoo.json (after every
cell, atomically).

Per (model, B): auto is first called until its choice is fixed (the static rule, then one or two timed
calls of each candidate engine; their number and total time are recorded as `settle_calls` /
`settle_s`), then INTERLEAVED rounds time, back to back, one plain forward+backward of the mean loss,
the autograd loop (reference.per_sample_grad_norms(mode="exact"): one forward, B autograd.grad calls)
and auto. speedup = min loop time / min auto time over the rounds; `speedup_per_round` the median of
the per-round ratios (rows in one round see the same machine state). Peak memory by bench/_harness.py
(torch's CPU allocator via the profiler), plain and auto, from an empty workspace pool.
Cells whose loop would take more than BUDGET_S seconds per call (estimated from the previous B, cost
~ B^1.5) are recorded as skipped. fp32, 2 threads (BNMEM_BENCH_THREADS), CPU.

The machine this ran on is shared: the JSON records the load average next to each cell.
Clock: BNMEM_BENCH_CLOCK=wall (default) or process (CPU time; with BNMEM_BENCH_THREADS=1 the steadiest
measure of the work on a shared machine, and the one whose memory column sees every allocation).
Run: BNMEM_BENCH_EXACT_ZOO=1 pytest bench/test_bench_exact_zoo.py --benchmark-only
  or: python bench/test_bench_exact_zoo.py [model,model,...] [B,B,...]
"""
import json
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import _harness  # noqa: E402
from bnmem_kernels.norms.exact import exact_report  # noqa: E402
from bnmem_kernels.norms.exact_chain import release_workspaces  # noqa: E402
from bnmem_kernels.reference import per_sample_grad_norms as reference  # noqa: E402
from bnmem_kernels.testing import ZOO, zoo_batch, zoo_model  # noqa: E402

BATCHES = (2, 4, 8, 16, 32, 64, 128, 256)
ROUNDS = 3
BUDGET_S = float(os.environ.get("BNMEM_BENCH_ZOO_BUDGET_S", "12"))
OUT = os.path.join(os.path.dirname(__file__), "results", "exact_zoo.json")
# "wall" (time.perf_counter) or "process" (time.process_time: CPU time of the process, the steadiest
# measure of the work on a shared machine with BNMEM_BENCH_THREADS=1; with more threads it counts spin-waits)
CLOCK = os.environ.get("BNMEM_BENCH_CLOCK", "wall")
_clock = time.process_time if CLOCK == "process" else time.perf_counter


def ce(o, t):
    return F.cross_entropy(o, t, reduction="none")


def plain(model, x, y):
    model.zero_grad(set_to_none=True)
    ce(model(x), y).mean().backward()


def loop(model, x, y):
    return reference(model, ce, x, y, mode="exact")


def auto(model, x, y):
    return exact_report(model, ce, x, y)


def _write(table):
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tmp = OUT + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(table, fh, indent=1)
    os.replace(tmp, OUT)


def cell(name, B):
    model, shape, k = zoo_model(name)
    x, y = zoo_batch(shape, B, k)
    row = {"model": name, "B": B, "load_average_before": os.getloadavg()[0]}
    t0 = time.perf_counter()
    rep = None
    for n in range(1, 13):
        out, rep = auto(model, x, y)
        if rep["why"].startswith("timed:"):
            break
    row.update(settle_calls=n, settle_s=round(time.perf_counter() - t0, 3), engine=rep["path"], why=rep["why"])
    truth = loop(model, x, y)
    row["max_rel_diff_auto_vs_loop"] = ((out.double() - truth.double()).abs() / truth.double()).max().item()
    times = {"plain": [], "loop": [], "auto": []}
    fns = {"plain": plain, "loop": loop, "auto": auto}
    for _ in range(ROUNDS):
        for k2, f in fns.items():
            t = _clock()
            r = f(model, x, y)
            times[k2].append(_clock() - t)
            if k2 == "auto":
                row.setdefault("engines_in_rounds", []).append(r[1]["path"])
    best = {k2: min(v) for k2, v in times.items()}
    row.update({f"{k2}_s": round(v, 5) for k2, v in best.items()})
    row["speedup"] = round(best["loop"] / best["auto"], 3)
    per = sorted(a / b for a, b in zip(times["loop"], times["auto"]))
    row["speedup_per_round"] = {"median": round(per[len(per) // 2], 3), "min": round(per[0], 3),
                                "max": round(per[-1], 3)}
    release_workspaces()
    mp = _harness.peak_memory(plain, (model, x, y))["peak_mem_bytes"]
    release_workspaces()
    ma = _harness.peak_memory(auto, (model, x, y))["peak_mem_bytes"]
    release_workspaces()
    row.update(plain_peak_mem_bytes=mp, auto_peak_mem_bytes=ma, mem_vs_plain=round(ma / max(mp, 1), 3))
    row["load_average_after"] = os.getloadavg()[0]
    return row, best["loop"]


def sweep(names=ZOO, batches=BATCHES):
    table = {"unit": f"speedup = autograd-loop time / auto time (min over interleaved rounds, clock {CLOCK}); "
                     "mem_vs_plain = auto's peak memory / one plain forward+backward's (torch's CPU allocator via "
                     "the profiler: allocations on worker threads are not seen, so measure memory with 1 thread)",
             "threads": torch.get_num_threads(), "clock": CLOCK, "rounds": ROUNDS, "budget_s": BUDGET_S,
             "note": "measured under load: the 2-core machine was shared with other jobs (load averages per cell)",
             "rows": []}
    if os.path.exists(OUT):       # keep the cells of other models from an earlier run
        try:
            with open(OUT) as fh:
                old = json.load(fh)
            table["rows"] = [r for r in old.get("rows", []) if r.get("model") not in names]
        except (OSError, ValueError):
            pass
    for name in names:
        prev = None
        for B in batches:
            if prev is not None and prev[1] * (B / prev[0]) ** 1.5 > BUDGET_S:
                table["rows"].append({"model": name, "B": B, "skipped": f"loop estimated > {BUDGET_S} s per call"})
                _write(table)
                continue
            row, loop_s = cell(name, B)
            prev = (B, loop_s)
            table["rows"].append(row)
            print(f"{name:24s} B={B:4d} {row['engine']:13s} speedup {row['speedup']:.2f} "
                  f"(per round {row['speedup_per_round']['median']:.2f}) mem {row['mem_vs_plain']:.2f}x "
                  f"load {row['load_average_after']:.1f}", flush=True)
            _write(table)
    return table


@pytest.mark.skipif(os.environ.get("BNMEM_BENCH_EXACT_ZOO") != "1",
                    reason="zoo x B sweep (tens of minutes): set BNMEM_BENCH_EXACT_ZOO=1")
def test_exact_zoo(benchmark):
    table = sweep()
    benchmark.group = "exact zoo"
    benchmark.extra_info.update(role="summary", zoo=table, peak_mem_bytes=0)
    benchmark.pedantic(lambda: None, rounds=1)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("BNMEM_BENCH_THREADS", "2")))
    names = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] else ZOO
    batches = tuple(int(b) for b in sys.argv[2].split(",")) if len(sys.argv) > 2 else BATCHES
    sweep(names, batches)
