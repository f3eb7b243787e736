"""What every benchmark row carries besides its time: peak memory, and a row even when it fails.

bench/conftest.py wires this in for every bench file, with no cooperation from the file:
  * after a benchmark has been timed, its function runs ONCE more, untimed, under a memory measure,
    and `extra_info` gets `peak_mem_bytes` (bytes allocated above what was allocated when the call
    started, at the call's high-water mark), `peak_mem_method` and `peak_mem_device`:
      - cuda: torch.cuda.reset_peak_memory_stats / max_memory_allocated (the caching allocator's
        live tensor bytes, not reserved memory);
      - cpu: torch's CPU allocator as seen by the profiler (profile_memory=True): the running sum of
        every allocation and free of tensor storage during the call (`peak_mem_torch_bytes`), plus
        the tracemalloc peak of Python and numpy allocations in the same call
        (`peak_mem_python_bytes`; numpy reports its buffers to tracemalloc, torch does not). The sum
        is an upper bound when the two peaks fall at different moments. Not counted: allocations on
        threads the profiler is not attached to (rare: kernels allocate their outputs on the
        calling thread) and native memory outside both. torch 2.13 exposes no CPU allocator
        statistics, and peak RSS keeps freed pages and only ever grows, hence the profiler.
    `BNMEM_BENCH_MEMORY=0` turns the extra call off. A file that measures memory itself and sets
    `extra_info["peak_mem_bytes"]` keeps its own value.
  * a benchmark test that raises becomes a row with `extra_info["status"] = "error"` (the test
    still fails), so the report shows it.

Bench files use `run_or_record` (or `record_failure`) for alternatives that may legitimately refuse
the work (Opacus refusing BatchNorm, jacrev running out of memory): the refusal becomes a row with
`status = "failed"` and the error message, and the test passes. See bench/README.md.
"""
from __future__ import annotations

import os

import torch
from pytest_benchmark.fixture import BenchmarkFixture

MEMORY_ENV = "BNMEM_BENCH_MEMORY"
_MAX_MESSAGE = 400


def _device_of(fixture) -> str:
    dev = str(fixture.extra_info.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    return "cuda" if dev.startswith("cuda") else "cpu"


def peak_memory(fn, args=(), kwargs=None, device: str = "cpu") -> dict:
    """Run `fn(*args, **kwargs)` once and return {"peak_mem_bytes", "peak_mem_method",
    "peak_mem_device"}: the most bytes held above the starting point at any moment of the call."""
    kwargs = kwargs or {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*args, **kwargs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return {"peak_mem_bytes": int(max(peak, 0)), "peak_mem_method": "torch.cuda.max_memory_allocated",
                "peak_mem_device": "cuda"}
    import tracemalloc

    from torch.autograd.profiler import profile

    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        with profile(profile_memory=True) as prof:  # tracemalloc's window inside: not the profiler's own
            py_base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            fn(*args, **kwargs)
            py_peak = max(tracemalloc.get_traced_memory()[1] - py_base, 0)
    finally:
        if not was_tracing:
            tracemalloc.stop()
    events = [e for e in prof.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return {"peak_mem_bytes": int(peak + py_peak), "peak_mem_torch_bytes": int(peak),
            "peak_mem_python_bytes": int(py_peak),
            "peak_mem_method": "torch.profiler CPU allocator + tracemalloc (numpy, Python)",
            "peak_mem_device": "cpu"}


def _measure_into(fixture, fn, args, kwargs) -> None:
    if fixture.disabled or os.environ.get(MEMORY_ENV, "1") == "0":
        return
    if "peak_mem_bytes" in fixture.extra_info:  # the bench file measured it itself
        return
    try:
        fixture.extra_info.update(peak_memory(fn, args, kwargs, _device_of(fixture)))
    except Exception as exc:  # a memory probe must never lose the timing row
        fixture.extra_info["peak_mem_error"] = f"{type(exc).__name__}: {exc}"[:_MAX_MESSAGE]


class MeasuredBenchmarkFixture(BenchmarkFixture):
    """pytest-benchmark's fixture, plus one untimed call under a memory measure after the timing."""

    def __call__(self, function_to_benchmark, *args, **kwargs):
        result = super().__call__(function_to_benchmark, *args, **kwargs)
        _measure_into(self, function_to_benchmark, args, kwargs)
        return result

    def pedantic(self, target, args=(), kwargs=None, setup=None, teardown=None, rounds=1, warmup_rounds=0,
                 iterations=1):
        result = super().pedantic(target, args=args, kwargs=kwargs, setup=setup, teardown=teardown,
                                  rounds=rounds, warmup_rounds=warmup_rounds, iterations=iterations)
        if not self.disabled and os.environ.get(MEMORY_ENV, "1") != "0" and "peak_mem_bytes" not in self.extra_info:
            try:
                kwargs = kwargs or {}
                if setup is not None:  # set up outside the measured window, as pytest-benchmark times it
                    made = setup()
                    if made:
                        args, kwargs = made
                _measure_into(self, target, args, kwargs)
                if teardown is not None:
                    teardown(*args, **kwargs)
            except Exception as exc:  # the timing row stands without its memory
                self.extra_info["peak_mem_error"] = f"{type(exc).__name__}: {exc}"[:_MAX_MESSAGE]
        return result


def install(fixture: BenchmarkFixture) -> BenchmarkFixture:
    """Turn the `benchmark` fixture of one test into a MeasuredBenchmarkFixture (same object, so
    pytest-benchmark's own isinstance checks and bookkeeping are untouched)."""
    if type(fixture) is BenchmarkFixture:
        fixture.__class__ = MeasuredBenchmarkFixture
    return fixture


def _has_timing(fixture) -> bool:
    return fixture.stats is not None and bool(fixture.stats.stats)


def _add_row(fixture, status: str, message: str) -> None:
    """Append a row with no timing (time 0, `extra_info["status"]` says why) to the session's results."""
    if fixture.disabled:
        return
    fixture.extra_info["status"] = status
    fixture.extra_info["error"] = message[:_MAX_MESSAGE]
    suffix = f" [{status}]"
    if fixture.stats is not None and not fixture.stats.stats:
        meta = fixture.stats  # created (and already listed) before the timed call raised
    else:
        fixture.name += suffix
        meta = fixture._make_stats(1)
    if not meta.name.endswith(suffix):
        meta.name += suffix
    meta.group = fixture.group
    meta.update(0.0)
    fixture.has_error = False  # pytest-benchmark leaves errored fixtures out of the JSON; this row says why
    fixture._mode = fixture._mode or "bnmem record_failure"


def record_failure(benchmark, exc, status: str = "failed") -> None:
    """Record that this row could not be produced: a row with `status` and the error message.

    Call it instead of timing, e.g. `except ValueError as exc: return record_failure(benchmark, exc)`.
    Set `benchmark.group` and `benchmark.extra_info` (role, name, shape, device) first."""
    message = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    _add_row(benchmark, status, " ".join(str(message).split()))


def run_or_record(benchmark, fn, *args, rounds: int | None = None, warmup_rounds: int = 0,
                  iterations: int = 1, **kwargs):
    """Call `fn(*args, **kwargs)` once untimed; if it raises, record a "failed" row and return None,
    else time it (`benchmark(fn, ...)` when `rounds` is None, else `benchmark.pedantic` with these
    rounds) and return its result. The untimed call doubles as a warm-up.

    For alternatives. A bnmem row that raises is recorded AND re-raised: our own failures fail the
    run."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        record_failure(benchmark, exc)
        if benchmark.extra_info.get("role") == "bnmem":
            raise
        return None
    if rounds is None:
        return benchmark(fn, *args, **kwargs)
    return benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=rounds, warmup_rounds=warmup_rounds,
                              iterations=iterations)


INTERRUPTED = "interrupted before a round finished (time limit or Ctrl-C)"


def close_unfinished(session_benchmarks: list, running=None) -> None:
    """Session end (bench/conftest.py): a benchmark stopped mid-timing (SIGINT from a time limit,
    Ctrl-C) has rows without data, which would crash pytest-benchmark's JSON writer and lose every
    row; make each an "error" row saying so. `running`: the fixture of the test that was running
    when the session stopped; stopped before its timing began (calibration, set-up), it gets a row too."""
    if running is not None and running.stats is None and not running.extra_info.get("status"):
        _add_row(running, "error", INTERRUPTED)
    for meta in session_benchmarks:
        if not meta.stats.data:
            meta.extra_info.setdefault("status", "error")
            meta.extra_info.setdefault("error", INTERRUPTED)
            meta.name += f" [{meta.extra_info['status']}]"
            meta.update(0.0)
            meta.fixture.has_error = False


def after_test(fixture, call_report) -> None:
    """Teardown hook (bench/conftest.py): a test that raised without a timing becomes an "error" row; a
    test skipped after naming its row (group and extra_info["role"] set) becomes a "skipped" row."""
    if call_report is None or _has_timing(fixture) or fixture.extra_info.get("status"):
        return
    if call_report.failed:
        crash = getattr(call_report.longrepr, "reprcrash", None)
        lines = str(call_report.longrepr).strip().splitlines()
        message = crash.message if crash is not None else (lines[-1] if lines else "test failed")
        _add_row(fixture, "error", message)
    elif call_report.skipped and fixture.group and fixture.extra_info.get("role"):
        longrepr = call_report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        _add_row(fixture, "skipped", reason.removeprefix("Skipped: "))
