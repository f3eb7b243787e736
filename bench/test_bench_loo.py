"""loo_influence (leave-one-out influence of every sample on one SGD step) vs the real alternatives.

Models (fp32, CPU, BNMEM_BENCH_THREADS threads, default 2): the suite's CNN (python/bnmem/models.py,
MNIST 1x14x14, width 12, 10 classes: the default run's model), the suite's ResNet-8 (resnet.py, same
input, width 12), and two models of the exact engine's test zoo (a 3-conv VGG-like BN-CNN with max
pools, 2x8x8; a stem + ResNet basic block with a downsampling shortcut, 2x6x6); B in {16, 64}.

Rows per case: bnmem auto (`loo_report`, its route recorded), the reference loop (B reduced-batch
forward+backward passes, reference/loo_influence.py), and torch.func.vmap over the removal index
(the "vmap" route: grad of the reduced-batch loss, vmapped). Every row's numbers are checked against
the loop (max relative error recorded). Timing: INTERLEAVED_ROUNDS rounds, each timing the three
rows back to back (a shared machine's load changes within seconds; within a round the rows see the
same state); ratios are min over rounds and the median/min/max of the per-round ratio. Results go to
bench/results/loo_ratios.json, labelled with the load average at the start and end ("under load"
when above 1 per core).
Run: `pytest bench/test_bench_loo.py --benchmark-only` (a few minutes on 2 cores: the loop at B = 64 on
ResNet-8 takes seconds per call).
"""
import json
import os
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnmem.models import build_model
from bnmem.resnet import build_resnet
from bnmem_kernels.influence import loo_report
from bnmem_kernels.reference import loo_influence as reference

INTERLEAVED_ROUNDS = int(os.environ.get("BNMEM_BENCH_LOO_ROUNDS", "3"))
GROUP = "loo_influence"
_RESULTS: dict = {}


def ce(o, t):
    return F.cross_entropy(o, t, reduction="none")


@pytest.fixture(scope="module", autouse=True)
def threads():
    old = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("BNMEM_BENCH_THREADS", "2")))
    yield
    torch.set_num_threads(old)


class _Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.down(x))


def make(name):
    """(model, input shape without B, classes)."""
    torch.manual_seed(0)
    if name == "suite_cnn":
        return build_model("cnn", "bn", (1, 14), 10, 12), (1, 14, 14), 10
    if name == "suite_resnet8":
        return build_resnet("resnet8", "bn", 1, 10, 12), (1, 14, 14), 10
    if name == "zoo_vgg":
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(5, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 3)), (2, 8, 8), 3
    if name == "zoo_resnet_basic":
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                             _Basic(3, 4, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)), (2, 6, 6), 3
    raise KeyError(name)


ROWS = {
    "bnmem_auto": lambda m, x, y: loo_report(m, ce, x, y),
    "reference_loop": lambda m, x, y: (reference(m, ce, x, y), {"route": "loop"}),
    "torch_func_vmap": lambda m, x, y: loo_report(m, ce, x, y, route="vmap"),
}
CASES = [(n, b) for n in ("suite_cnn", "suite_resnet8", "zoo_vgg", "zoo_resnet_basic") for b in (16, 64)]


@pytest.mark.parametrize("name,B", CASES, ids=[f"{n}-B{b}" for n, b in CASES])
def test_loo(benchmark, name, B):
    model, shape, k = make(name)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(B, *shape, generator=g), torch.randint(0, k, (B,), generator=g)
    load0 = os.getloadavg()[0]
    truth = reference(model, ce, x, y).double()
    row = {"model": name, "B": B, "input": list(shape), "threads": torch.get_num_threads(), "dtype": "float32"}
    for r, fn in ROWS.items():
        out, rep = fn(model, x, y)
        row[r + "_route"] = rep["route"]
        row[r + "_max_rel_err_vs_loop"] = ((out.double() - truth).abs() / truth).max().item()
        assert row[r + "_max_rel_err_vs_loop"] < 1e-3
    times = {r: [] for r in ROWS}
    for _ in range(INTERLEAVED_ROUNDS):
        for r, fn in ROWS.items():
            t0 = time.perf_counter()
            fn(model, x, y)
            times[r].append(time.perf_counter() - t0)
    best = {r: min(t) for r, t in times.items()}
    row["min_s"] = best
    for alt in ("reference_loop", "torch_func_vmap"):
        per = sorted(a / b for a, b in zip(times[alt], times["bnmem_auto"]))
        row[f"speedup_vs_{alt}"] = best[alt] / best["bnmem_auto"]
        row[f"speedup_vs_{alt}_per_round"] = {"median": per[len(per) // 2], "min": per[0], "max": per[-1]}
    load1 = os.getloadavg()[0]
    row["loadavg_1min"] = [load0, load1]
    row["under_load"] = max(load0, load1) > (os.cpu_count() or 1)
    _RESULTS[f"{name}-B{B}"] = row
    benchmark.group = GROUP
    benchmark.extra_info.update(role="bnmem", device="cpu", **{k: v for k, v in row.items() if k != "min_s"})
    benchmark.pedantic(ROWS["bnmem_auto"], args=(model, x, y), rounds=1)


def test_write_ratios(benchmark):
    """bench/results/loo_ratios.json: every case's row (runs after the cases)."""
    out = {"note": "interleaved A/B rounds; 'under_load' when the 1-min load average exceeded the core count",
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "cases": _RESULTS}
    path = os.path.join(os.path.dirname(__file__), "results", "loo_ratios.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(tmp, path)
    benchmark.group = GROUP + " ratios"
    benchmark.extra_info.update(role="summary", peak_mem_bytes=0)
    benchmark.pedantic(lambda: None, rounds=1)
