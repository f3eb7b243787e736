"""mode="exact" per-sample gradient norms vs the real alternatives, on a small BN-CNN (3 conv+BN
layers, CIFAR-like 3x16x16 inputs, 10 classes), B = 64, 2 threads.

Rows (group "exact B64"): one plain forward+backward of the mean loss (the unit), the bnmem exact
engine (auto path = "chain" here: the model is an nn.Sequential; and the general "seed_batched" path
forced), the autograd loop (the reference: one forward, B calls of
autograd.grad), `is_grads_batched` (one forward, one vmapped backward of the B one-hot seeds), and
torch.func.jacrev (the full B x P Jacobian, on a copy of the model whose BatchNorms use batch
statistics without running stats). Every row returns the same [B] norms (checked once, untimed).
Peak memory comes from bench/_harness.py (torch's CPU allocator via the profiler), measured after
release_workspaces(), so the chain engine's buffers kept between calls count as its own. The last test
puts the time and memory ratios into its extra_info (`ratios`), also written to
bench/results/exact_ratios.json: from the pytest-benchmark minima (`speedup_auto_vs`), from the minima of
INTERLEAVED_ROUNDS rounds that time every row back to back (`..._interleaved`), and the ratio within each
such round, its median/min/max over the rounds (`..._per_round`: rows timed seconds apart on a shared VM
can see different machine states; within a round they see the same one).

On a shared, loaded machine wall time is dominated by the other load (the many small kernels of the
autograd loop suffer most); the numbers in the closing note were taken with one thread and CPU time:
`BNMEM_BENCH_THREADS=1 pytest bench/test_bench_exact.py --benchmark-only --benchmark-timer=time.process_time`.
"""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import _harness
from bnmem_kernels.norms.exact import exact_report
from bnmem_kernels.norms.exact_chain import release_workspaces
from bnmem_kernels.reference import per_sample_grad_norms as reference

B = 64
ROUNDS = 2
INTERLEAVED_ROUNDS = 10
GROUP = f"exact B{B}"
_RESULTS: dict = {}


def ce(o, t):
    return F.cross_entropy(o, t, reduction="none")


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("BNMEM_BENCH_THREADS", "2")))
    yield
    torch.set_num_threads(old)


def bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10))


@pytest.fixture(scope="module")
def problem():
    model = bn_cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    truth = reference(copy.deepcopy(model).double(), ce, x.double(), y, mode="exact")
    return model, x, y, truth


def plain(model, x, y):
    model.zero_grad(set_to_none=True)
    ce(model(x), y).mean().backward()


def loop(model, x, y):
    return reference(model, ce, x, y, mode="exact")


def grads_batched(model, x, y):
    b = x.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses = ce(model(x), y)
    gs = torch.autograd.grad(losses, params, grad_outputs=torch.eye(b), is_grads_batched=True)
    return torch.stack([g.reshape(b, -1).square().sum(1) for g in gs]).sum(0).sqrt()


def jacrev_norms(model, x, y):
    from torch.func import functional_call, jacrev

    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda p: ce(functional_call(model, p, (x,)), y))(params)
    return torch.stack([j.reshape(B, -1).square().sum(1) for j in jac.values()]).sum(0).sqrt()


def batch_stats_copy(model):
    """jacrev cannot update running statistics inside its vmap: a copy whose BNs keep none."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.track_running_stats = False
            mod.running_mean = mod.running_var = mod.num_batches_tracked = None
    return m.train()


ROWS = {
    "plain_fwd_bwd": ("baseline", plain),
    "bnmem_exact_auto": ("bnmem", lambda m, x, y: exact_report(m, ce, x, y)[0]),
    "bnmem_exact_seed_batched": ("bnmem", lambda m, x, y: exact_report(m, ce, x, y, path="seed_batched")[0]),
    "autograd_loop": ("alternative", loop),
    "is_grads_batched": ("alternative", grads_batched),
    "jacrev": ("alternative", jacrev_norms),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_exact(benchmark, problem, name):
    role, fn = ROWS[name]
    model, x, y, truth = problem
    if name == "jacrev":
        model = batch_stats_copy(model)
    benchmark.group = GROUP
    benchmark.extra_info.update(role=role, name=name, B=B, input=[3, 16, 16], threads=torch.get_num_threads(),
                                device="cpu")
    if name == "bnmem_exact_auto":
        benchmark.extra_info["path"] = exact_report(model, ce, x, y)[1]["path"]
    if role != "baseline":
        try:
            out = fn(model, x, y)
        except Exception as exc:   # e.g. out of memory for the batched alternatives
            return _harness.record_failure(benchmark, exc)
        err = ((out.double() - truth).abs() / truth).max().item()
        benchmark.extra_info["max_rel_err_vs_fp64_loop"] = err
        assert err < 1e-4, err
    if role == "bnmem":
        # measured from an empty workspace pool: the buffers the chain engine keeps between calls count
        release_workspaces()
        benchmark.extra_info.update(_harness.peak_memory(fn, (model, x, y)))
        benchmark.extra_info["workspace_pool_bytes_after_call"] = release_workspaces()
    benchmark.pedantic(fn, args=(model, x, y), rounds=ROUNDS, warmup_rounds=1 if role == "baseline" else 0)
    _RESULTS[name] = {"min_s": benchmark.stats.stats.min, "median_s": benchmark.stats.stats.median}


def test_ratios(benchmark, problem):
    """Ratios of the rows above (time: min over rounds; memory: peak above the start)."""
    model, x, y, _ = problem
    mem = {}
    pool_held = {}
    for name, (_, fn) in ROWS.items():
        m = batch_stats_copy(model) if name == "jacrev" else model
        release_workspaces()      # the chain engine's buffers kept between calls count as its memory
        try:
            mem[name] = _harness.peak_memory(fn, (m, x, y))["peak_mem_bytes"]
        except Exception:
            mem[name] = None
        pool_held[name] = release_workspaces()
    base_t = _RESULTS.get("plain_fwd_bwd", {}).get("min_s")
    ratios = {"time_vs_plain": {}, "mem_vs_plain": {}, "speedup_auto_vs": {}}
    for name, r in _RESULTS.items():
        if base_t:
            ratios["time_vs_plain"][name] = r["min_s"] / base_t
        if mem.get(name) and mem.get("plain_fwd_bwd"):
            ratios["mem_vs_plain"][name] = mem[name] / mem["plain_fwd_bwd"]
    auto = _RESULTS.get("bnmem_exact_auto", {}).get("min_s")
    for alt in ("autograd_loop", "is_grads_batched", "jacrev"):
        if auto and alt in _RESULTS:
            ratios["speedup_auto_vs"][alt] = _RESULTS[alt]["min_s"] / auto
    # wall time with the bench's threads, min over rounds interleaving the rows, so every row sees the same
    # machine state (a shared VM's load comes and goes within seconds)
    import time

    fns = {n: ROWS[n][1] for n in ("plain_fwd_bwd", "bnmem_exact_auto", "bnmem_exact_seed_batched", "autograd_loop",
                                   "is_grads_batched")}
    times = {n: [] for n in fns}
    for _ in range(INTERLEAVED_ROUNDS):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            fn(model, x, y)
            times[n].append(time.perf_counter() - t0)
    best = {n: min(t) for n, t in times.items()}
    ratios["interleaved_wall_s"] = best
    ratios["speedup_auto_vs_interleaved"] = {alt: best[alt] / best["bnmem_exact_auto"]
                                             for alt in ("autograd_loop", "is_grads_batched")}
    # the same ratio within each round (rows timed back to back see the same machine state), over the rounds
    per_round = {alt: sorted(a / e for a, e in zip(times[alt], times["bnmem_exact_auto"]))
                 for alt in ("autograd_loop", "is_grads_batched")}
    ratios["speedup_auto_vs_per_round"] = {alt: {"median": r[len(r) // 2], "min": r[0], "max": r[-1]}
                                           for alt, r in per_round.items()}
    ratios["peak_mem_bytes"] = mem
    ratios["workspace_pool_bytes_after_call"] = {n: b for n, b in pool_held.items() if b}
    benchmark.group = GROUP + " ratios"
    benchmark.extra_info.update(role="summary", ratios=ratios, peak_mem_bytes=mem.get("bnmem_exact_auto") or 0)
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "exact_ratios.json"), "w") as fh:
        json.dump(ratios, fh, indent=1)
    benchmark.pedantic(lambda: None, rounds=1)


@pytest.mark.skipif(os.environ.get("BNMEM_BENCH_EXACT_SWEEP") != "1",
                    reason="B sweep (a few minutes): set BNMEM_BENCH_EXACT_SWEEP=1")
def test_sweep_over_batch_size(benchmark):
    """CPU time (min of 2; the machine is shared) and peak memory vs B of the exact engine and the autograd loop, each over one
    plain forward+backward at that B; writes bench/results/exact_sweep.json and exact_sweep.png."""
    import time

    model = bn_cnn()
    rows = []
    for b in (4, 8, 16, 32, 64, 128, 256):
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 10, (b,), generator=g)
        row = {"B": b}
        for name, fn in (("plain", plain), ("exact", lambda m, x, y: exact_report(m, ce, x, y)[0]),
                         ("loop", loop)):
            best = float("inf")
            for _ in range(2):
                t0 = time.process_time()
                fn(model, x, y)
                best = min(best, time.process_time() - t0)
            row[name + "_s"] = best
            release_workspaces()
            row[name + "_mem"] = _harness.peak_memory(fn, (model, x, y))["peak_mem_bytes"]
            release_workspaces()
        rows.append(row)
    out = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "exact_sweep.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        bs = [r["B"] for r in rows]
        for name in ("exact", "loop"):
            ax[0].plot(bs, [r[name + "_s"] / r["plain_s"] for r in rows], "o-", label=name)
            ax[1].plot(bs, [r[name + "_mem"] / r["plain_mem"] for r in rows], "o-", label=name)
        ax[0].set(xscale="log", yscale="log", xlabel="B", ylabel="time / plain fwd+bwd")
        ax[1].set(xscale="log", xlabel="B", ylabel="peak memory / plain fwd+bwd")
        ax[0].legend()
        fig.suptitle("mode='exact', 3-conv BN-CNN, 3x16x16, CPU")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "exact_sweep.png"), dpi=100)
    except ImportError:
        pass
    benchmark.group = GROUP + " sweep"
    benchmark.extra_info.update(role="summary", sweep=rows, peak_mem_bytes=0)
    benchmark.pedantic(lambda: None, rounds=1)


GPU_CASES = [("bn_cnn", 64), ("bn_cnn", 256), ("resnet18", 64), ("resnet18", 128)]


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("BNMEM_BENCH_EXACT_GPU_DRYRUN") != "1",
                    reason="GPU exact bench: needs CUDA (BNMEM_BENCH_EXACT_GPU_DRYRUN=1 runs it on CPU, tiny B)")
def test_exact_gpu(benchmark):
    """The issue's GPU targets: exact auto vs the autograd loop and is_grads_batched on CUDA, small BN-CNN
    and ResNet-18 (CIFAR form) at 3x32x32, B in GPU_CASES; wall time with synchronize (min of 3), peak
    memory from torch.cuda. Writes bench/results/exact_gpu_ratios.json (device name inside)."""
    import time

    from bnmem.resnet import build_resnet

    dry = not torch.cuda.is_available()
    dev = torch.device("cpu" if dry else "cuda")

    def sync():
        if not dry:
            torch.cuda.synchronize()

    def timed(fn, m, x, y, rounds=3):
        fn(m, x, y)
        sync()
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn(m, x, y)
            sync()
            best = min(best, time.perf_counter() - t0)
        return best

    def peak(fn, m, x, y):
        if dry:
            return None
        release_workspaces()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(m, x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    rows = []
    for arch, b in GPU_CASES:
        b = 8 if dry else b
        torch.manual_seed(0)
        model = (bn_cnn() if arch == "bn_cnn" else build_resnet("resnet18", "bn", 3, 10, 16 if dry else 64)).to(dev)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(b, 3, 32, 32, generator=g).to(dev)
        y = torch.randint(0, 10, (b,), generator=g).to(dev)
        fns = {"plain_fwd_bwd": plain, "bnmem_exact_auto": lambda m, x, y: exact_report(m, ce, x, y)[0],
               "autograd_loop": loop, "is_grads_batched": grads_batched}
        row = {"arch": arch, "B": b, "path": exact_report(model, ce, x, y)[1]["path"]}
        truth = loop(model, x, y).double()
        for name, fn in fns.items():
            try:
                if name != "plain_fwd_bwd":
                    err = ((fn(model, x, y).double() - truth).abs() / truth).max().item()
                    row[name + "_max_rel_err_vs_loop"] = err
                row[name + "_s"] = timed(fn, model, x, y)
                row[name + "_peak_mem_bytes"] = peak(fn, model, x, y)
            except Exception as exc:          # e.g. out of memory for the batched route
                row[name + "_error"] = f"{type(exc).__name__}: {exc}"[:200]
                if not dry:
                    torch.cuda.empty_cache()
        auto = row.get("bnmem_exact_auto_s")
        for alt in ("autograd_loop", "is_grads_batched"):
            if auto and row.get(alt + "_s"):
                row["speedup_auto_vs_" + alt] = row[alt + "_s"] / auto
        if row.get("plain_fwd_bwd_peak_mem_bytes") and row.get("bnmem_exact_auto_peak_mem_bytes") is not None:
            row["mem_auto_vs_plain"] = row["bnmem_exact_auto_peak_mem_bytes"] / row["plain_fwd_bwd_peak_mem_bytes"]
        rows.append(row)
    out = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(0), "rows": rows}
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    name = "exact_gpu_ratios_dryrun.json" if dry else "exact_gpu_ratios.json"
    with open(os.path.join(os.path.dirname(__file__), "results", name), "w") as fh:
        json.dump(out, fh, indent=1)
    benchmark.group = GROUP + " gpu"
    benchmark.extra_info.update(role="summary", gpu=out, peak_mem_bytes=0)
    benchmark.pedantic(lambda: None, rounds=1)
