"""The suite under hostile-but-fair use: CIFAR batches that carry code or the wrong data, bad
config values, a second writer on one run folder, kill -9 of the parent of pool workers, changed
files in a finished run folder, and a model that diverges while it trains."""
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from bnmem import cifar, data
from bnmem.cli import main
from bnmem.config import build_config
from bnmem.errors import BnmemError
from suite_helpers import MICRO, ROOT


# -- 1. no code runs from data ------------------------------------------------------------------
class _Payload:
    """Pickles to `os.system("touch <marker>")`: what a hostile CIFAR batch does on pickle.load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_folder(tmp_path, where="data_batch_3", as_value=False):
    folder = Path(cifar.write_synthetic_cifar(tmp_path / "cifar", n_per_batch=20, seed=0))
    marker = tmp_path / "PAYLOAD_RAN"
    if as_value:   # a look-alike batch that hides the call inside a real-looking dict
        with open(folder / where, "rb") as f:
            batch = pickle.load(f, encoding="bytes")   # the test's own synthetic file
        batch[b"batch_label"] = _Payload(marker)
        obj = batch
    else:
        obj = _Payload(marker)
    with open(folder / where, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return folder, marker


@pytest.mark.parametrize("as_value", [False, True], ids=["whole-file", "inside-a-batch"])
def test_malicious_batch_never_runs(tmp_path, as_value):
    folder, marker = _hostile_folder(tmp_path, as_value=as_value)
    with pytest.raises(BnmemError, match=r"cannot read CIFAR-10 batch .*data_batch_3.*(posix|os)\.system.*refused"):
        data._load_cifar10(str(folder))
    assert not marker.exists(), "the pickle's payload ran"


def test_cli_run_on_a_malicious_batch_exits_nonzero_and_the_payload_never_runs(tmp_path, capsys):
    folder, marker = _hostile_folder(tmp_path, where="test_batch", as_value=True)
    rc = main(["run", "--dataset", "cifar10", "--data-dir", str(folder), "--out", str(tmp_path / "o"),
               "--no-progress", "--image-size", "8", "--n-in", "40", "--n-test", "20", "--canaries", "2",
               "--models", "4", "--epochs", "1", "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("bnmem: error:") and len(err.splitlines()) == 1, err
    assert "test_batch" in err and not marker.exists()


def test_object_arrays_are_refused(tmp_path):
    folder = Path(cifar.write_synthetic_cifar(tmp_path / "c", n_per_batch=4))
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.array([1, "x"], dtype=object), b"labels": [0]}, f, protocol=2)
    with pytest.raises(BnmemError, match="data_batch_1.*holds Python objects"):
        data._load_cifar10(str(folder))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_batch_layouts_load(tmp_path, protocol):
    """What numpy writes at each pickle protocol (protocol 5: out-of-band _frombuffer) is admitted."""
    folder = Path(cifar.write_synthetic_cifar(tmp_path / "c", n_per_batch=6, seed=1))
    for name in cifar.CIFAR_NAMES:
        with open(folder / name, "rb") as f:
            b = pickle.load(f, encoding="bytes")   # the test's own synthetic file
        with open(folder / name, "wb") as f:
            pickle.dump(b, f, protocol=protocol)
    x, y, k = data._load_cifar10(str(folder))
    assert x.shape == (36, 3, 32, 32) and k == 10 and y.min() >= 0 and y.max() <= 9


def _rewrite(path, **changes):
    with open(path, "rb") as f:
        b = pickle.load(f, encoding="bytes")   # the test's own synthetic file
    b.update({k.encode(): v for k, v in changes.items()})
    with open(path, "wb") as f:
        pickle.dump(b, f, protocol=2)


@pytest.mark.parametrize("case, match", [
    ("labels_100", r"labels must be in 0\.\.9 for cifar10, found 0\.\.99"),
    ("missing_test", r"partial CIFAR-10 folder: missing test_batch"),
    ("short_batch", r"training batches hold different numbers of rows .*data_batch_2 7"),
    ("float_data", r"data_batch_1.*must be a uint8 array \[rows, 3072\].*float64"),
    ("label_count", r"data_batch_1.*one label per row \(20 rows\), got 19"),
])
def test_a_cifar10_folder_must_hold_real_cifar10(tmp_path, case, match):
    folder = Path(cifar.write_synthetic_cifar(tmp_path / "c", n_per_batch=20, seed=2))
    rng = np.random.default_rng(0)
    if case == "labels_100":
        _rewrite(folder / "data_batch_4", labels=[0] * 19 + [99])
    elif case == "missing_test":
        (folder / "test_batch").unlink()
    elif case == "short_batch":
        _rewrite(folder / "data_batch_2", data=rng.integers(0, 256, (7, 3072), dtype=np.uint8), labels=[1] * 7)
    elif case == "float_data":
        _rewrite(folder / "data_batch_1", data=rng.random((20, 3072)))
    elif case == "label_count":
        _rewrite(folder / "data_batch_1", labels=[1] * 19)
    cfg = build_config(overrides=dict(dataset="cifar10", data_dir=str(folder), image_size=8, n_in=40, n_test=20,
                                      canaries={k: 2 for k in ("mislabeled", "other_domain", "noise", "near_ood")}))
    with pytest.raises(BnmemError, match=match):
        data.build(cfg)


def test_cifar100_folder(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name, n in (("train", 30), ("test", 10)):
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": rng.integers(0, 100, n).tolist(),
                         b"coarse_labels": rng.integers(0, 20, n).tolist()}, f, protocol=2)
    x, y, k = data._load_cifar(str(tmp_path), "cifar100")
    assert x.shape == (40, 3, 32, 32) and k == 100 and y.max() < 100
    (d / "test").unlink()
    with pytest.raises(BnmemError, match="partial CIFAR-100 folder: missing test"):
        data._load_cifar(str(tmp_path), "cifar100")


# Load calls that can run code from a file, and how a safe call looks. A new unsafe site anywhere in the
# tree fails this test; an allowed one needs a line here saying why it is safe.
_UNSAFE = [
    (re.compile(r"\bpickle\.loads?\("), None),
    (re.compile(r"\b(cloudpickle|dill|joblib|marshal|shelve)\.(loads?|open)\("), None),
    (re.compile(r"\.Unpickler\("), None),
    (re.compile(r"\btorch\.load\("), re.compile(r"weights_only\s*=\s*True")),
    (re.compile(r"\ballow_pickle\s*=\s*True"), None),
    (re.compile(r"\byaml\.load\("), re.compile(r"SafeLoader")),
    (re.compile(r"\bnp\.load\(|\bnumpy\.load\("), re.compile(r"^(?!.*allow_pickle\s*=\s*True)")),
]
_ALLOWED = {   # (path, pattern) -> why it is safe
    ("python/bnmem/data.py", r"\.Unpickler\("): "the restricted CIFAR unpickler itself (find_class allow-list)",
    ("tests/suite/test_hostile.py", r"\bpickle\.loads?\("): "reads back synthetic batches the test wrote",
    ("tests/suite/test_resnet.py", r"\bpickle\.loads?\("): "reads back a synthetic batch the test wrote",
}


def test_no_unsafe_load_sites_in_the_tree():
    bad = []
    for folder, _, files in os.walk(ROOT):
        if any(part in folder for part in (".git", "__pycache__", ".venv", "build", ".eggs")):
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
            for i, line in enumerate(lines):
                code = line.split("#")[0]
                for pat, safe in _UNSAFE:
                    if not pat.search(code) or (rel, pat.pattern) in _ALLOWED:
                        continue
                    call = " ".join(lines[i:i + 3])   # a call may wrap onto the next lines
                    if safe is not None and safe.search(call):
                        continue
                    bad.append(f"{rel}:{i + 1}: {line.strip()}")
    assert not bad, "load sites that can run code from a file:\n" + "\n".join(bad)


# -- 5. every config value checked at the door ------------------------------------------------
@pytest.mark.parametrize("flags, match", [
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr", "-1"], r"--lr must be in \(0, 10\]"),
    (["--lr", "0"], r"--lr must be in \(0, 10\]"),
    (["--lr", "1e6"], r"--lr must be in \(0, 10\]"),
    (["--seed", "-1"], r"--seed must be in \[0, 2\^32\)"),
    (["--seed", str(2 ** 40)], r"--seed must be in \[0, 2\^32\)"),
    (["--workers", "-3"], r"--workers must be >= 0"),
])
def test_bad_values_fail_at_the_door(tmp_path, capsys, flags, match):
    out = tmp_path / "o"
    t0 = time.perf_counter()
    rc = main(["run", "--quick", "--out", str(out), "--no-progress", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("bnmem: error:"), err
    assert re.search(match, err), err
    assert not out.exists() and time.perf_counter() - t0 < 5   # before any work


def test_bad_values_in_a_toml_fail_at_the_door(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    for body, match in (("lr = nan\n", "finite"), ("momentum = 1.5\n", r"momentum must be in \[0, 1\)"),
                        ("frozen_warmup_epochs = -2\n", "frozen_warmup_epochs must be >= 0")):
        toml.write_text(body)
        rc = main(["run", "--config", str(toml), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and re.search(match, err) and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("manifest", ["[]", '"text"', '{"config": [1], "stages": {}}', '{"stages": []}'])
def test_a_manifest_that_is_not_an_object(tmp_path, capsys, manifest):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text(manifest)
    for argv in (["run", "--quick", "--out", str(out), "--no-progress"], ["report", str(out)]):
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "is not a bnmem manifest" in err, err


# -- 3. one writer per run folder -----------------------------------------------------------------
_HOLD = textwrap.dedent("""
    import sys, time
    from bnmem.runfolder import RunFolder
    with RunFolder(sys.argv[1]).locked():
        print("locked", flush=True)
        time.sleep(60)
""")


def test_second_writer_refused_at_once_and_a_killed_holder_does_not_block(tmp_path, capsys):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        rc = main(["run", "--quick", "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and f"pid {holder.pid}" in err and "in use" in err, err
        assert time.perf_counter() - t0 < 5 and not (out / "manifest.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").exists()          # the killed run's lock file is still there ...
    from bnmem.runfolder import RunFolder
    with RunFolder(out).locked():            # ... and does not block
        assert f"pid {os.getpid()}" in (out / ".lock").read_text()


# -- 4. no orphan pool workers ----------------------------------------------------------------------
_POOL = textwrap.dedent("""
    import time
    from concurrent.futures import wait
    from bnmem.executor import Pool
    pool = Pool(2)
    ex = pool.executor()
    wait([ex.submit(time.sleep, 0.3) for _ in range(2)])        # both workers up
    futs = [ex.submit(time.sleep, 120) for _ in range(2)]       # busy, like training
    time.sleep(0.3)
    print(" ".join(str(p) for p in ex._processes), flush=True)
    time.sleep(120)
""")


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_die_with_a_killed_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", _POOL], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2, workers
        kids = set(_children(parent.pid)) | set(workers)   # the workers and multiprocessing's resource tracker
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 5
    while time.time() < deadline and any(_alive(p) for p in kids):
        time.sleep(0.05)
    left = [p for p in kids if _alive(p)]
    for p in left:   # do not leave them behind even when the test fails
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes alive 5 s after kill -9 of their parent: {left}"


# -- 2. run-folder integrity ------------------------------------------------------------------------
def _sha(p):
    import hashlib
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished MICRO run (in-process, one worker), copied by each test that damages it."""
    from bnmem import pipeline
    out = tmp_path_factory.mktemp("integrity") / "run"
    pipeline.run(build_config(overrides=MICRO), out, log=lambda *a: None)
    return out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_every_written_file_is_recorded(finished_run):
    man = json.loads((finished_run / "manifest.json").read_text())
    files = man["files"]
    on_disk = {str(p.relative_to(finished_run)) for p in finished_run.rglob("*") if p.is_file()} - {"manifest.json",
                                                                                                      ".lock"}
    assert set(files) == on_disk, set(files) ^ on_disk
    for rel, entry in files.items():
        assert entry["sha256"] == _sha(finished_run / rel) and entry["bytes"] == (finished_run / rel).stat().st_size
    res = json.loads((finished_run / "results.json").read_text())
    threads = res["hardware"]["threads"]   # the layout the study ran with (MICRO: workers=1)
    assert threads["torch_threads_per_process"] == 1 and threads["worker_processes"] == 1


def test_the_report_shows_training_stability(finished_run, tmp_path):
    from bnmem import report
    assert "bn: 0 of 4 models diverged; gn: 0 of 4 models diverged." in (finished_run / "report.md").read_text()
    out = _copy(finished_run, tmp_path / "run")
    man = json.loads((out / "manifest.json").read_text())
    man["stages"]["train"]["diverged"]["bn"] = [dict(m=3, attempt=0, epoch=5, step=57, lr=0.0497,
                                                     reason="non-finite training loss")]
    (out / "manifest.json").write_text(json.dumps(man))
    report.render(str(out), log=lambda *a: None)
    assert ("bn: 1 of 4 models diverged (m3 attempt 0: non-finite training loss at epoch 5, step 57, lr 0.0497); "
            "gn: 0 of 4 models diverged.") in (out / "report.md").read_text()


def test_damaged_files_are_reported_and_only_their_unit_redone(finished_run, tmp_path):
    from bnmem import pipeline
    out = _copy(finished_run, tmp_path / "run")
    before = {str(p.relative_to(out)): (p.stat().st_mtime_ns, _sha(p)) for p in out.rglob("*")
              if p.is_file() and p.name not in ("manifest.json", ".lock")}
    # a same-size bit flip in a checkpoint, a truncated trace, a deleted data.npz, a changed logits file
    pt = out / "models" / "gn" / "m002.pt"
    raw = bytearray(pt.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    pt.write_bytes(bytes(raw))
    tr = out / "models" / "bn" / "m001.npz"
    tr.write_bytes(tr.read_bytes()[:100])
    (out / "data.npz").unlink()
    lg = out / "logits" / "bn.npz"
    lg.write_bytes(lg.read_bytes()[:-8] + b"\0" * 8)
    logs = []
    pipeline.run(build_config(overrides=MICRO), out, log=logs.append)
    text = "\n".join(logs)
    assert re.search(r"integrity: models/gn/m002\.pt is changed since it was written.*retraining that model", text)
    assert re.search(r"integrity: models/bn/m001\.npz is truncated: 100 bytes", text)
    assert re.search(r"integrity: data\.npz is missing; not used: rebuilding the data", text)
    assert re.search(r"integrity: logits/bn\.npz is changed .*redoing that variant's probe", text)
    assert "differs from the one recorded" not in text   # the redone files equal the recorded ones
    after = {str(p.relative_to(out)): (p.stat().st_mtime_ns, _sha(p)) for p in out.rglob("*")
             if p.is_file() and p.name not in ("manifest.json", ".lock")}
    redone = {"models/gn/m002.pt", "models/gn/m002.npz", "models/bn/m001.npz", "models/bn/m001.pt", "data.npz",
              "data.json", "logits/bn.npz"}
    for rel, (mtime, sha) in before.items():
        if rel in redone:
            assert after[rel][0] != mtime, f"{rel} was not redone"
        elif re.match(r"(models/|logits/|data\.|scores\.npz|results\.json)", rel):   # the report: redone every run
            assert after[rel][0] == mtime, f"{rel} was redone but nothing was wrong with its unit"
    assert after["models/gn/m002.pt"][1] == before["models/gn/m002.pt"][1]     # retrained bit for bit
    assert after["logits/bn.npz"][1] == before["logits/bn.npz"][1]
    man = json.loads((out / "manifest.json").read_text())
    assert {e["file"] for e in man["repairs"]} == {"models/gn/m002.pt", "models/bn/m001.npz", "data.npz",
                                                    "logits/bn.npz"}
    assert pipeline.RunFolder(out).verify() == {}


def test_a_redone_model_that_differs_redoes_what_was_computed_from_it(finished_run, tmp_path, monkeypatch):
    """The retrained checkpoint is not the recorded one (here: perturbed on purpose): the variant's
    logits and the scores are redone from it; the other variant's logits are kept."""
    import torch
    from bnmem import pipeline, train
    from bnmem.runfolder import load_state_dict, save_state_dict
    out = _copy(finished_run, tmp_path / "run")
    (out / "models" / "gn" / "m002.pt").unlink()
    real = train.train_one

    def perturbed(root, cfg_dict, variant, m):
        r = real(root, cfg_dict, variant, m)
        pt = train.model_paths(root, variant, m)[0]
        sd = load_state_dict(pt)
        save_state_dict(pt, {k: v + 1e-3 if torch.is_floating_point(v) else v for k, v in sd.items()})
        return r

    monkeypatch.setattr(train, "train_one", perturbed)
    keep = {f: (out / f).stat().st_mtime_ns for f in ("logits/bn.npz", "logits/gn.npz", "scores.npz")}
    logs = []
    pipeline.run(build_config(overrides=MICRO), out, log=logs.append)
    text = "\n".join(logs)
    assert "integrity: models/gn/m002.pt is missing" in text
    assert "retrained models/gn/m002.pt differs from the one recorded; redoing the gn probe and the scores" in text
    assert (out / "logits/bn.npz").stat().st_mtime_ns == keep["logits/bn.npz"]
    assert (out / "logits/gn.npz").stat().st_mtime_ns != keep["logits/gn.npz"]
    assert (out / "scores.npz").stat().st_mtime_ns != keep["scores.npz"]
    assert pipeline.RunFolder(out).verify() == {}


def test_rebuilt_data_that_differs_stops_the_run(finished_run, tmp_path, monkeypatch, capsys):
    from bnmem import data as data_mod
    out = _copy(finished_run, tmp_path / "run")
    (out / "data.npz").unlink()
    real = data_mod.build

    def other(cfg):   # the data source changed since the models were trained
        arrays, meta = real(cfg)
        arrays["x"] = arrays["x"] + 1e-3
        return arrays, meta

    monkeypatch.setattr(data_mod, "build", other)
    rc = main(["run", "--out", str(out), "--no-progress", "--workers", "1", "--config", str(_micro_toml(tmp_path))])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "data.npz was rebuilt but differs from the one this run's models were trained on" in err


def _micro_toml(tmp_path):
    toml = tmp_path / "micro.toml"
    lines = [f"{k} = {json.dumps(v)}" for k, v in MICRO.items() if k not in ("canaries", "workers", "progress")]
    toml.write_text("\n".join(lines) + "\n[canaries]\n" + "\n".join(f"{k} = {v}" for k, v in MICRO["canaries"].items())
                    + "\n")
    return toml


def test_report_refuses_changed_inputs(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path / "run")
    sc = out / "scores.npz"
    raw = bytearray(sc.read_bytes())
    raw[-30] ^= 1
    sc.write_bytes(bytes(raw))
    rc = main(["report", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "scores.npz is changed since it was written" in err, err


# -- 7. a diverged model is caught where it happens -------------------------------------------------
def _micro_folder(tmp_path, **over):
    from bnmem.runfolder import RunFolder, write_npz
    cfg = build_config(overrides={**MICRO, **over})
    rf = RunFolder(tmp_path / "run")
    rf.open_for(cfg)
    arrays, _ = data.build(cfg)
    write_npz(rf.path("data.npz"), **arrays)
    return cfg, rf


def test_a_diverged_attempt_is_retrained_with_the_next_seed_and_recorded(tmp_path, monkeypatch):
    import torch
    from bnmem import train
    from bnmem.runfolder import read_npz
    cfg, rf = _micro_folder(tmp_path)
    real = torch.nn.functional.cross_entropy
    calls = {"train": 0}

    def ce(*a, **k):   # the training loss turns NaN once (the first attempt's 3rd step)
        out = real(*a, **k)
        if sys._getframe(1).f_code.co_name == "_train_attempt":
            calls["train"] += 1
            if calls["train"] == 3:
                return out * float("nan")
        return out

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", ce)
    r = train.train_one(rf.root, {**cfg.hashed_dict(), "data_dir": None}, "bn", 0)
    assert [d[:3] + [d[4]] for d in r["diverged"]] == [[0, 0, 2, "non-finite training loss"]]
    t = read_npz(train.model_paths(rf.root, "bn", 0)[1])
    assert int(t["attempt"]) == 1 and t["diverged"].tolist() == [[0, 0, 2]] and np.isfinite(t["train_loss"]).all()
    assert train.seeds_for(cfg, 0, 1) != train.seeds_for(cfg, 0)
    assert train.stability_summary(rf.root, cfg)["diverged"]["bn"][0]["step"] == 2


def test_a_model_that_always_diverges_stops_the_run_at_train_time(tmp_path, capsys, monkeypatch):
    import torch
    real = torch.nn.functional.cross_entropy

    def ce(*a, **k):   # every training loss of model 1 is NaN (all its attempts diverge)
        out = real(*a, **k)
        caller = sys._getframe(1)
        if caller.f_code.co_name == "_train_attempt" and caller.f_locals.get("m") == 1:
            return out * float("nan")
        return out

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", ce)
    toml = tmp_path / "c.toml"
    toml.write_text("models = 4\nepochs = 2\nn_in = 60\nn_test = 40\nvariants = ['none']\nwidth = 4\n"
                    "batch_size = 16\nexact_models = 0\nbootstrap = 10\n[canaries]\nmislabeled = 3\nother_domain = 3\n"
                    "noise = 3\nnear_ood = 3\n")
    out = tmp_path / "o"
    rc = main(["run", "--config", str(toml), "--out", str(out), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert re.search(r"bnmem: error: train: none model 1 diverged in all 3 attempts \(attempt 0: non-finite training "
                     r"loss at epoch 0, step 0, lr [\d.e-]+; attempt 1: .*lower --lr", err), err
    assert not (out / "scores.npz").exists() and not (out / "logits").exists()
    assert (out / "models" / "none" / "m000.pt").exists()   # the models finished before it are kept


_REAPED = textwrap.dedent("""
    import subprocess, sys, time
    from bnmem.executor import start_reaper
    reaper = start_reaper()
    time.sleep(0.5)
    child = subprocess.Popen(["sleep", "60"])   # a process that does not die with its parent
    print(child.pid, reaper.pid, flush=True)
    time.sleep(60)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reaper_kills_what_would_outlive_a_killed_parent():
    """The local Ray instance's guard (executor.start_reaper): descendants that do not die with their
    parent are killed when it is killed."""
    parent = subprocess.Popen([sys.executable, "-c", _REAPED], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        child, reaper = (int(p) for p in parent.stdout.readline().split())
        time.sleep(0.7)   # the reaper has seen the child
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 5
    while time.time() < deadline and (_alive(child) or _alive(reaper)):
        time.sleep(0.05)
    left = [p for p in (child, reaper) if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left


_RAY = textwrap.dedent("""
    import time
    from bnmem.ray_executor import RayPool
    pool = RayPool(init_kwargs=dict(num_cpus=2))
    ex = pool.executor()
    fut = ex.submit(time.sleep, 120)
    time.sleep(8)
    print("ready", flush=True)
    time.sleep(120)
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_ray_instance_dies_with_a_killed_driver():
    pytest.importorskip("ray")
    parent = subprocess.Popen([sys.executable, "-c", _RAY], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert parent.stdout.readline().strip() == "ready"
        tree, frontier = set(), {parent.pid}
        while frontier:
            frontier = {c for p in frontier for c in _children(p)} - tree
            tree |= frontier
        assert len(tree) >= 4, tree   # gcs, raylet, agents, workers, the reaper
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.1)
    left = [p for p in tree if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"Ray processes alive 10 s after kill -9 of the driver: {left}"
