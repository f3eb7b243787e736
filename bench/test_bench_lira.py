"""lira_scores: the fused kernels vs the real alternatives, all M models as targets in turn.

Alternatives (same conf/keep, same [M, N] scores):
  * the per-example numpy/scipy loop in the style of the public LiRA code
    (bnmem_kernels.reference.lira.lira_scores_loop; O(M^2 N A) with Python-level loops over targets
    and examples). Too slow to run whole: it is timed on the first LOOP_SUBSET examples and scaled
    linearly in N (its cost is linear in N: one iteration per (target, example), the global-std
    precomputation also linear); the row says so in extra_info (timed_examples, time_scale: report.py
    compares the scaled time);
  * a vectorized plain-PyTorch implementation (reference.lira_scores_torch, fp64, O(M N A): the
    same running-sum leave-one-out and one torch.sort per (n, a) for the median), role "alternative".
The bnmem row (backend cpu on CPU; cuda and triton on a GPU) records in extra_info:
speedup_vs_loop (scaled), speedup_vs_vectorized (min over rounds on both sides), and on a GPU the
achieved bandwidth (bytes of conf + keep read and scores written / time) against a measured copy
bandwidth (torch clone of a tensor of the same size).
CPU: M = 64, N = 20,000, A = 2. GPU: M = 256, N = 50,000, A = 18.
"""
import time
import warnings

import pytest
import torch

import bnmem_kernels as bk
from bnmem_kernels import _backend
from bnmem_kernels.reference import lira as ref

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
M, N, A = (256, 50_000, 18) if GPU else (64, 20_000, 2)
LOOP_SUBSET = 100  # examples the loop is timed on
VARIANTS = {
    "online-mean": dict(online=True, variance="per_example", center="mean"),
    "online-median": dict(online=True, variance="per_example", center="median"),
    "offline-global-one_sided": dict(online=False, variance="global", center="mean", offline_stat="one_sided"),
}
_TIMES = {}  # (variant, name) -> best seconds, shared between the rows of a group


def _problem(device=DEVICE):
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(M, N, generator=g).argsort(0) < M // 2  # balanced: each example in half
    conf = torch.randn(M, N, A, generator=g) * 2 + 3 * keep[..., None]
    return conf.to(device), keep.to(device)


def _sync(x):
    if GPU:
        torch.cuda.synchronize()
    return x


def _group(variant):
    return f"lira_scores M{M}_N{N}_A{A} {variant}"


def _best(fn, rounds):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        _sync(fn())
        best = min(best, time.perf_counter() - t)
    return best


def _loop_time(variant, conf, keep):
    if (variant, "loop") not in _TIMES:
        c = conf[:, :LOOP_SUBSET].double().cpu().numpy()
        k = keep[:, :LOOP_SUBSET].cpu().numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _TIMES[variant, "loop"] = _best(lambda: ref.lira_scores_loop(c, k, **VARIANTS[variant]), 1) * N / LOOP_SUBSET
    return _TIMES[variant, "loop"]


def _vectorized(conf, keep, kw):
    return ref.lira_scores_torch(conf, keep, **kw)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_alternative_vectorized_torch(benchmark, variant):
    conf, keep = _problem()
    benchmark.group = _group(variant)
    benchmark.extra_info.update(role="alternative", name="vectorized PyTorch (fp64)", shape=[M, N, A],
                                device=DEVICE)
    kw = VARIANTS[variant]
    benchmark.pedantic(lambda: _sync(_vectorized(conf, keep, kw)), rounds=2, warmup_rounds=1)
    _TIMES[variant, "vectorized"] = benchmark.stats.stats.min


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_summary_public_style_loop(benchmark, variant):
    """The loop on LOOP_SUBSET examples (all M targets); extra_info carries the scaled time."""
    conf, keep = _problem("cpu")
    benchmark.group = _group(variant)
    scale = N / LOOP_SUBSET
    benchmark.extra_info.update(role="alternative", name="public-LiRA-style numpy/scipy loop",
                                shape=[M, LOOP_SUBSET, A], device="cpu", timed_examples=LOOP_SUBSET,
                                scale=scale, time_scale=scale, note=f"time of {LOOP_SUBSET} of {N} examples; scale linearly by {scale:g}")
    c = conf[:, :LOOP_SUBSET].double().numpy()
    k = keep[:, :LOOP_SUBSET].numpy()

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ref.lira_scores_loop(c, k, **VARIANTS[variant])

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    _TIMES[variant, "loop"] = benchmark.stats.stats.min * scale
    benchmark.extra_info["scaled_time_s"] = _TIMES[variant, "loop"]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu"])
def test_bnmem(benchmark, backend, variant):
    why = _backend.unavailable_reason(backend, DEVICE)
    if why or (backend == "triton" and not GPU):
        pytest.skip(why or "the Triton interpreter is not timed")
    conf, keep = _problem()
    kw = VARIANTS[variant]
    benchmark.group = _group(variant)
    benchmark.extra_info.update(role="bnmem", backend=backend, headline=True, shape=[M, N, A], device=DEVICE)
    benchmark.pedantic(lambda: _sync(bk.lira.lira_scores(conf, keep, backend=backend, **kw)),
                       rounds=3, warmup_rounds=1)
    t = benchmark.stats.stats.min
    if (variant, "vectorized") not in _TIMES:
        _TIMES[variant, "vectorized"] = _best(lambda: _vectorized(conf, keep, kw), 2)
    loop = _loop_time(variant, conf, keep)
    info = dict(time_min_s=t, vectorized_time_min_s=_TIMES[variant, "vectorized"],
                loop_time_scaled_s=loop, loop_timed_examples=LOOP_SUBSET,
                speedup_vs_vectorized=_TIMES[variant, "vectorized"] / t,
                speedup_vs_loop=loop / t,
                loop_note=f"loop timed on {LOOP_SUBSET} of {N} examples and scaled linearly",
                torch_threads=torch.get_num_threads())
    if GPU:
        moved = conf.numel() * conf.element_size() + keep.numel() + M * N * 4
        buf = torch.empty(moved // 4, dtype=torch.float32, device=DEVICE)
        copy = _best(lambda: buf.clone(), 5)
        info.update(bytes_moved=moved, achieved_GBps=moved / t / 1e9, copy_GBps=2 * buf.numel() * 4 / copy / 1e9,
                    fraction_of_copy_bandwidth=(moved / t) / (2 * buf.numel() * 4 / copy))
    benchmark.extra_info.update(info)
