"""The Triton kernels compile for a real GPU target (sm_90), not only run in the CPU interpreter.

The full check (every kernel x dtype x constexpr variant the wrappers launch, sm_90 and sm_80) is
`python -m bnmem_kernels.triton.compile_check`, a step of .ci/run (minutes). Here: that every kernel
is launched by some case of the check, and one variant through the shared `_mm_nt` helper compiled
down to a cubin (it failed before: early returns inside constexpr ifs). Subprocesses, because the
tests run with TRITON_INTERPRET=1, under which nothing compiles.
"""
import os
import subprocess
import sys

import pytest


def _compiler_available():
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
        get_ptxas(90)
    except Exception:  # noqa: BLE001 -- no triton, no NVIDIA backend or no ptxas: nothing to check
        return False
    return True


pytestmark = pytest.mark.skipif(not _compiler_available(), reason="triton's NVIDIA compiler (ptxas) is not available")


def _check(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "bnmem_kernels.triton.compile_check", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_every_kernel_is_launched_by_a_case():
    r = _check("--only", "no-such-kernel", "-j", "1")  # compiles nothing; fails on uncovered kernels or case errors
    assert r.returncode == 0, r.stdout + r.stderr
    assert "UNCOVERED" not in r.stdout and "CASE ERROR" not in r.stdout


def test_mm_nt_fp32_variant_compiles_for_sm90():
    r = _check("--only", "ghost_norm_linear torch.float32 gram=False strided=False", "--arch", "90", "-j", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1/1 compiles passed" in r.stdout, r.stdout


@pytest.mark.slow
def test_every_variant_compiles():
    r = _check("--arch", "90,80", timeout=3600)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
