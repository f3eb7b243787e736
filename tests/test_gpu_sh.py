"""bench/gpu.sh's plan: --dry-run prints every stage with its cap inside the budget, --skip takes full
stage names ("bench:gpu") and prefixes ("bench"), --bench-args keeps quoted words, at most 8 files."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _dry(tmp_path, *args):
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), str(tmp_path / "out"), "--dry-run", *args],
                       env=env, capture_output=True, text=True, timeout=300)
    return r


def test_plan_within_budget_and_skips(tmp_path):
    r = _dry(tmp_path, "--budget", "200", "--skip", "env,sweep,tests,bench:gpu")
    assert r.returncode == 0, r.stdout + r.stderr
    plan = r.stdout.split("now on this CPU")[0]
    for stage in ("build", "e2e", "sanitizer", "bench:cpu", "report"):
        assert f"  {stage} " in plan
    assert "bench:gpu  skipped" in plan and "bench:cpu  skipped" not in plan
    assert "worst case" in plan and int(plan.split("worst case ")[1].split("s")[0]) <= 200
    files = os.listdir(tmp_path / "out")
    assert 0 < len(files) <= 8 and "summary.md" in files and "console.log" in files


@pytest.mark.slow  # collects the bench files (~25 s on a loaded 2-core machine)
def test_bench_args_quoted_k_is_combined(tmp_path):
    r = _dry(tmp_path, "--skip", "env,sweep,tests", "--bench-args", "-k 'lira and triton' --benchmark-min-rounds 1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "-k (cuda or triton or gpu) and (lira and triton) --collect-only --benchmark-min-rounds 1" in r.stdout
    assert "test_bnmem[triton-online-mean]" in r.stdout and "cuda-online-mean" not in r.stdout
    r = _dry(tmp_path, "--skip", "env,sweep,tests")     # no --bench-args: bench/ only (an empty argument
    assert r.returncode == 0, r.stdout + r.stderr         # once made pytest collect the whole repository)
    assert "bench/test_bench_exact.py::test_exact_gpu" in r.stdout and "tests/kernels" not in r.stdout
