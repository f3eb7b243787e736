"""Benchmark session setup (every bench/test_bench_*.py gets this without doing anything):

* BNMEM_BENCH_THREADS=N sets the intra-op thread count (recorded in machine_info);
* machine_info of the JSON records hardware and versions: `bnmem` (bnmem_kernels.info.collect():
  torch/triton/CUDA versions, what was built, backends) and `bnmem_hardware` (CPU model and count,
  memory, GPU name and memory) -- bench/report.py names the results file after it;
* every benchmark row gets its peak memory in extra_info (bench/_harness.py: one extra untimed call);
* a benchmark test that raises is still a row (extra_info status="error"); alternatives that may
  refuse the work use `_harness.run_or_record` / `record_failure` (status="failed", test passes).
"""
import os
import platform

import pytest
import torch

import _harness

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "0")  # never time the Triton interpreter

# BNMEM_BENCH_THREADS=N: intra-op threads (torch and the extension's OpenMP) for the whole run. On a
# machine shared with other work, N=1 avoids OpenMP barrier stalls that slow 2-thread runs 100x.
if os.environ.get("BNMEM_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BNMEM_BENCH_THREADS"]))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def hardware() -> dict:
    hw = {"cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "mem_total_bytes": _mem_total_bytes(),
          "torch_threads": torch.get_num_threads(), "gpu": None, "gpu_count": 0, "gpu_mem_bytes": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hw.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_mem_bytes=props.total_memory,
                  gpu_capability=f"{props.major}.{props.minor}")
    return hw


def pytest_benchmark_update_machine_info(config, machine_info):
    from bnmem_kernels import info

    machine_info["bnmem"] = info.collect()
    machine_info["bnmem_hardware"] = hardware()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call":
        item._bnmem_call_report = outcome.get_result()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None:  # before pytest-benchmark writes the JSON
        try:
            _harness.close_unfinished(bs.benchmarks, getattr(session.config, "_bnmem_running", None))
        except Exception as exc:  # never lose the finished rows over the unfinished ones
            print(f"bench/conftest.py: unfinished rows not recorded: {exc!r}")
    yield


@pytest.fixture
def benchmark(benchmark, request):
    """pytest-benchmark's fixture with peak memory and failure rows (bench/_harness.py)."""
    fixture = _harness.install(benchmark)
    request.config._bnmem_running = fixture  # for a session stopped mid-test (pytest_sessionfinish)
    yield fixture
    request.config._bnmem_running = None
    _harness.after_test(fixture, getattr(request.node, "_bnmem_call_report", None))
