"""Bad input: a one-line error saying what to do, non-zero exit, no traceback."""

import pytest

from bnmem.cli import main
from bnmem.config import build_config
from bnmem.errors import BnmemError


@pytest.mark.parametrize("args, needle", [
    (["run", "--dataset", "imagenet"], "unknown dataset"),
    (["run", "--variants", "bn,weird"], "unknown variant"),
    (["run", "--dataset", "cifar10"], "--data-dir"),
    (["run", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "not a folder"),
    (["run", "--models", "2"], "too few"),
    (["run", "--models", "5"], "even"),
    (["run", "--models", "4", "--attacks", "lira_online"], "at least 8"),
    (["run", "--attacks", "magic"], "unknown attack"),
    (["run", "--config", "/nonexistent.toml"], "not found"),
    (["report", "/nonexistent/run"], "not a bnmem run folder"),
])
def test_bad_input_one_line(args, needle, capsys, tmp_path):
    rc = main(args + (["--out", str(tmp_path / "o")] if args[0] == "run" else []))
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and needle in err, err
    assert "Traceback" not in err


def test_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["run", "--quick", "--out", str(blocker / "sub")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "writable" in err, err


def test_non_bnmem_folder_refused(capsys, tmp_path):
    (tmp_path / "stuff.txt").write_text("mine")
    rc = main(["run", "--quick", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "non-empty" in err


def test_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("models = 8\nbogus = 1\n")
    with pytest.raises(BnmemError, match="unknown key"):
        build_config(toml_path=str(bad))
    bad.write_text("models = 'eight'\n")
    with pytest.raises(BnmemError, match="must be int"):
        build_config(toml_path=str(bad))
    bad.write_text("models = [\n")
    with pytest.raises(BnmemError, match="not valid TOML"):
        build_config(toml_path=str(bad))


def test_cifar_folder_without_batches(capsys, tmp_path):
    (tmp_path / "cifar").mkdir()
    rc = main(["run", "--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "data_batch_1" in err and len(err.splitlines()) == 1


def test_cifar_corrupt_batch(capsys, tmp_path):
    d = tmp_path / "cifar"
    d.mkdir()
    (d / "data_batch_1").write_bytes(b"not a pickle")
    rc = main(["run", "--dataset", "cifar10", "--data-dir", str(d), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "cannot read CIFAR-10 batch" in err
