"""bench/conftest.py + bench/_harness.py on a throwaway bench file: every row gets peak memory and
hardware; a refusal, a crash and a named skip are rows in the JSON, not silently dropped."""
import json
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(autouse=True)
def _native_modules_loaded_once():
    """pytester's in-process runs unload modules first imported inside them; triton's nanobind
    extension aborts the process when imported twice, so load it (as bench/conftest.py will) first."""
    from bnmem_kernels import info

    info.collect()

FAKE = '''
import pytest, torch
from _harness import record_failure, run_or_record

def test_ok(benchmark):
    benchmark.group = "g B8"
    benchmark.extra_info.update(role="bnmem", shape=[8, 4], device="cpu")
    benchmark.pedantic(lambda: torch.empty(1 << 20, dtype=torch.uint8).fill_(1), rounds=2)

def test_setup(benchmark):
    benchmark.group = "g B8"
    benchmark.extra_info.update(role="alternative", name="doubles", device="cpu")
    benchmark.pedantic(lambda x: x * 2, setup=lambda: ((torch.ones(1 << 16),), {}), rounds=2)

def test_numpy(benchmark):
    import numpy as np
    benchmark.extra_info.update(role="alternative", name="numpy loop", device="cpu")
    benchmark.pedantic(lambda: np.ones(1 << 18).sum(), rounds=1)

def test_refuses(benchmark):
    benchmark.group = "g B8"
    benchmark.extra_info.update(role="alternative", name="opacus")
    def refuse():
        raise ValueError("BatchNorm cannot support\\n per-sample gradients")
    assert run_or_record(benchmark, refuse, rounds=2) is None

def test_explicit(benchmark):
    benchmark.group = "g B8"
    benchmark.extra_info.update(role="alternative", name="jacrev")
    record_failure(benchmark, MemoryError("out of memory"))

def test_crashes(benchmark):
    benchmark.group = "g B8"
    benchmark.extra_info.update(role="alternative", name="crashy")
    benchmark(lambda: 1 / 0)

def test_skips(benchmark):
    benchmark.group = "g B8"
    benchmark.extra_info.update(role="alternative", name="needs gpu")
    pytest.skip("no CUDA")

def test_skip_unnamed(benchmark):
    pytest.skip("not a row: no group/role yet")

def test_probe_off(benchmark, monkeypatch):
    monkeypatch.setenv("BNMEM_BENCH_MEMORY", "0")
    benchmark.extra_info.update(role="bnmem")
    benchmark.pedantic(lambda: torch.ones(8), rounds=1)

def test_bnmem_raises(benchmark):
    benchmark.group = "g B8"
    benchmark.extra_info.update(role="bnmem", backend="cpu")
    run_or_record(benchmark, lambda: [][1])
'''


def test_rows_memory_and_failures(pytester, monkeypatch):
    monkeypatch.delenv("BNMEM_BENCH_MEMORY", raising=False)
    for name in ("conftest.py", "_harness.py"):
        shutil.copy(BENCH / name, pytester.path / name)
    pytester.makepyfile(test_bench_fake=FAKE)
    out = pytester.path / "out.json"
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--benchmark-only",
                                          f"--benchmark-json={out}", "-q")
    result.assert_outcomes(passed=6, failed=2, skipped=2)  # crashes + bnmem_raises fail the run

    data = json.loads(out.read_text())
    assert data["machine_info"]["bnmem"]["torch"]
    assert data["machine_info"]["bnmem_hardware"]["cpu_count"] >= 1
    rows = {b["name"].split(" [")[0]: b for b in data["benchmarks"]}
    assert set(rows) == {"test_ok", "test_setup", "test_refuses", "test_explicit", "test_crashes", "test_skips",
                         "test_bnmem_raises", "test_probe_off", "test_numpy"}
    ok = rows["test_ok"]["extra_info"]
    assert ok["peak_mem_device"] == "cpu" and ok["peak_mem_bytes"] >= 1 << 20  # the 1 MiB buffer is seen
    assert ok["peak_mem_torch_bytes"] >= 1 << 20 and ok["peak_mem_python_bytes"] < 1 << 16
    assert "status" not in ok and rows["test_ok"]["stats"]["rounds"] == 2
    npy = rows["test_numpy"]["extra_info"]  # numpy buffers are seen through tracemalloc
    assert npy["peak_mem_torch_bytes"] == 0 and npy["peak_mem_python_bytes"] >= 2 << 20
    # setup's input is allocated outside the measured window; the output (x * 2) inside it
    assert 1 << 18 <= rows["test_setup"]["extra_info"]["peak_mem_bytes"] < 2 << 18
    expect = {"test_refuses": ("failed", "ValueError: BatchNorm cannot support per-sample gradients"),
              "test_explicit": ("failed", "MemoryError: out of memory"),
              "test_crashes": ("error", "ZeroDivisionError: division by zero"),
              "test_skips": ("skipped", "no CUDA"),
              "test_bnmem_raises": ("failed", "IndexError: list index out of range")}
    for name, (status, message) in expect.items():
        extra = rows[name]["extra_info"]
        assert (extra["status"], extra["error"]) == (status, message), name
        assert rows[name]["group"] == "g B8" and "peak_mem_bytes" not in extra
    assert "peak_mem_bytes" not in rows["test_probe_off"]["extra_info"]  # BNMEM_BENCH_MEMORY=0



def test_interrupted_rows_are_kept():
    """A benchmark stopped mid-timing (gpu.sh's per-file time limit sends SIGINT) leaves a row
    with no data; close_unfinished turns it into an error row so the JSON is still written."""
    import importlib.util
    from types import SimpleNamespace

    from pytest_benchmark.stats import Metadata

    spec = importlib.util.spec_from_file_location("bnmem_bench_harness", BENCH / "_harness.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    fx = SimpleNamespace(name="test_slow", fullname="b.py::test_slow", group="g B8", param=None, params=None,
                         extra_info={"role": "alternative"}, cprofile_stats=None, has_error=False)
    done = SimpleNamespace(**dict(vars(fx), name="test_done", extra_info={}))
    unfinished, finished = Metadata(fx, iterations=1, options={}), Metadata(done, iterations=1, options={})
    finished.update(0.5)
    metas = [unfinished, finished]
    # the test running when the session stopped, still calibrating (no Metadata yet)
    running = SimpleNamespace(**dict(vars(fx), name="test_calibrating", extra_info={"role": "bnmem"}),
                              disabled=False, stats=None, _mode="benchmark(...)")

    def make_stats(iterations):
        running.stats = Metadata(running, iterations=iterations, options={})
        metas.append(running.stats)
        return running.stats

    running._make_stats = make_stats
    harness.close_unfinished(metas, running)
    assert metas[-1].name == "test_calibrating [error]" and running.extra_info["status"] == "error"
    assert metas[-1].as_dict()["stats"]["rounds"] == 1
    assert unfinished.as_dict()["stats"]["median"] == 0.0 and unfinished.name == "test_slow [error]"
    assert fx.extra_info["status"] == "error" and "interrupted" in fx.extra_info["error"]
    assert finished.name == "test_done" and finished.stats.data == [0.5] and "status" not in done.extra_info
