"""Session fixture: one `bnmem run --quick` shared by the end-to-end tests."""
import time

import pytest

from suite_helpers import run_cli


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One `bnmem run --quick` for the whole session: (folder, seconds, completed process)."""
    out = tmp_path_factory.mktemp("quick") / "run"
    t0 = time.perf_counter()
    proc = run_cli("run", "--quick", "--out", str(out), "--no-progress")
    dt = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, dt, proc
