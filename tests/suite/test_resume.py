"""kill -9 in the middle of training, then rerun: no finished model lost or retrained, the run completes."""
import hashlib
import os
import signal
import subprocess
import time

from suite_helpers import bnmem_cmd, run_cli

TOML = """[bnmem]
n_in = 60
n_test = 40
models = 8
epochs = 3
variants = ["bn", "gn"]
width = 4
batch_size = 16
bootstrap = 10
exact_models = 1
exact_points = 2
probe_batch = 8
[bnmem.canaries]
mislabeled = 3
other_domain = 3
noise = 3
near_ood = 3
"""


def _finished(out):
    return {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted((out / "models").rglob("m*.*")) if p.suffix in (".pt", ".npz")}


def test_kill9_mid_training_then_resume(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(TOML)
    out = tmp_path / "run"
    proc = subprocess.Popen(bnmem_cmd("run", "--config", str(cfg), "--out", str(out), "--workers", "2",
                                      "--no-progress"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "models").exists() and len(list((out / "models").rglob("m*.pt"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make the test config bigger"
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker processes, mid-training
    proc.wait()
    time.sleep(0.2)
    before = _finished(out)
    done_pts = [p for p in before if p.suffix == ".pt"]
    assert 2 <= len(done_pts) < 16
    # every finished checkpoint has its trace (written first) and loads
    for p in done_pts:
        assert p.with_suffix(".npz") in before

    res = run_cli("run", "--config", str(cfg), "--out", str(out), "--workers", "2", "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stdout
    assert f"{16 - len(done_pts)} of 16 models to train ({len(done_pts)} already done)" in res.stdout
    after = _finished(out)
    for p, stamp in before.items():
        if p.suffix == ".pt" or p.with_suffix(".pt") in before:
            assert after[p] == stamp, f"{p.name} was retrained or rewritten"
    assert len([p for p in after if p.suffix == ".pt"]) == 16
    assert not list(out.rglob(".tmp-*"))
    assert (out / "report.md").is_file()
