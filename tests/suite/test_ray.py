"""Ray executor: same models and numbers as the local executor; killed workers retried without
losing finished models; shipping files to workers that cannot see the run folder."""
import json
import os
import signal
import sys

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (optional extra: pip install 'bnmem[ray]')")

from bnmem import pipeline, train  # noqa: E402
from bnmem.config import build_config  # noqa: E402
from bnmem.ray_executor import RayPool, make_pool  # noqa: E402
from bnmem.runfolder import VOLATILE_NPZ_KEYS  # noqa: E402
from suite_helpers import MICRO  # noqa: E402

VOLATILE = ("versions", "hardware", "timings")


@pytest.fixture(scope="module")
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    pipeline.run(build_config(overrides={**MICRO, "workers": 1}), out, log=lambda *a: None)
    return out


def _numbers(out):
    res = json.loads((out / "results.json").read_text())
    for k in VOLATILE:
        res.pop(k, None)
    return res


def _same_files(a, b):
    for f in ("data.npz", "scores.npz", "logits/bn.npz", "logits/gn.npz", "models/bn/m000.npz", "models/gn/m003.npz"):
        za, zb = np.load(a / f), np.load(b / f)
        assert za.files == zb.files
        for k in set(za.files) - set(VOLATILE_NPZ_KEYS):   # the trace's wall times
            np.testing.assert_array_equal(za[k], zb[k], err_msg=f"{f}:{k}")
    for m in ("bn/m000.pt", "bn/m003.pt", "gn/m001.pt"):
        sa = torch.load(a / "models" / m, weights_only=True)
        sb = torch.load(b / "models" / m, weights_only=True)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), m


def test_ray_run_matches_local(local_ray, local_run, tmp_path):
    out = tmp_path / "ray"
    with RayPool() as pool:  # joins the test's Ray instance (and leaves it running)
        pipeline.run(build_config(overrides={**MICRO, "workers": 2}), out, log=lambda *a: None, pool=pool)
    assert pool.submitted >= 8 + 8  # train and probe units (2 variants x 4 models; + score units) went through Ray
    assert ray.is_initialized()
    assert _numbers(out) == _numbers(local_run)
    _same_files(local_run, out)
    assert (out / "examples.csv").read_text() == (local_run / "examples.csv").read_text()


def test_ray_shipped_files_match_local(local_ray, local_run, tmp_path):
    """Workers that do not see the run folder: inputs go through the object store, outputs come back."""
    out = tmp_path / "ship"
    with RayPool(ship_files=True) as pool:
        pipeline.run(build_config(overrides={**MICRO, "workers": 2}), out, log=lambda *a: None, pool=pool)
    assert _numbers(out) == _numbers(local_run)
    _same_files(local_run, out)
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")]


def kill_once_then_train(root, cfg_dict, variant, m):
    """Dies by SIGKILL on its first attempt (as an OOM-killed or preempted worker would)."""
    marker = os.path.join(root, f"attempted-{variant}-{m}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return train.train_one(root, cfg_dict, variant, m)


def _data_folder(tmp_path, name):
    from bnmem import data
    from bnmem.runfolder import RunFolder, write_npz
    cfg = build_config(overrides=MICRO)
    rf = RunFolder(tmp_path / name)
    rf.open_for(cfg)
    arrays, _ = data.build(cfg)
    write_npz(rf.path("data.npz"), **arrays)
    return rf.root, {**cfg.hashed_dict(), "data_dir": None}


def test_killed_worker_is_retried_and_finished_models_kept(local_ray, local_run, tmp_path):
    root, cfg_dict = _data_folder(tmp_path, "kill")
    with RayPool(max_retries=2) as pool:
        ex = pool.executor()
        ok = ex.submit(train.train_one, root, cfg_dict, "gn", 1).result(timeout=120)
        mtime = os.path.getmtime(train.model_paths(root, "gn", 1)[0])
        r = ex.submit(kill_once_then_train, root, cfg_dict, "bn", 0).result(timeout=120)
    assert ok["m"] == 1 and r["variant"] == "bn" and os.path.exists(os.path.join(root, "attempted-bn-0"))
    assert train.is_done(root, "bn", 0) and os.path.getmtime(train.model_paths(root, "gn", 1)[0]) == mtime
    for v, m in (("bn", 0), ("gn", 1)):  # the retried unit's model is the one the local run trained
        a = torch.load(train.model_paths(root, v, m)[0], weights_only=True)
        b = torch.load(train.model_paths(str(local_run), v, m)[0], weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)

    # without retries the death is reported (not swallowed)
    root2, _ = _data_folder(tmp_path, "kill2")
    with RayPool(max_retries=0) as pool:
        with pytest.raises(ray.exceptions.RayError):
            pool.executor().submit(kill_once_then_train, root2, cfg_dict, "bn", 0).result(timeout=120)
    assert not train.is_done(root2, "bn", 0) and not [f for f in os.listdir(root2) if f.startswith(".tmp-")]


def test_task_exception_keeps_its_type(local_ray, tmp_path):
    from bnmem.ray_executor import RunFolderNotVisible
    (tmp_path / "data.npz").write_bytes(b"not an npz")
    with RayPool() as pool:
        fut = pool.executor().submit(train.train_one, str(tmp_path), {}, "bn", 0)
        with pytest.raises(ValueError):  # np.load's own error, raised at once (not a retried type)
            fut.result(timeout=120)
        fut = pool.executor().submit(train.train_one, str(tmp_path / "nowhere"), {}, "bn", 0)
        with pytest.raises(RunFolderNotVisible, match="not visible on Ray node"):
            fut.result(timeout=120)


def test_make_pool_and_bad_args():
    from bnmem.errors import BnmemError
    from bnmem.executor import Pool
    assert isinstance(make_pool("local", workers=1), Pool)
    assert isinstance(make_pool("ray", ray_address="auto"), RayPool)
    with pytest.raises(BnmemError, match="workers 1"):
        make_pool("ray", workers=1)
    with pytest.raises(BnmemError, match="unknown executor"):
        make_pool("dask")
    with pytest.raises(ValueError, match="max_retries"):
        RayPool(max_retries=-1)
    with pytest.raises(ValueError, match="ship_files"):
        RayPool(ship_files="yes")


def test_cli_flags_parse():
    from bnmem.cli import build_parser
    a = build_parser().parse_args(["run", "--quick", "--executor", "ray", "--ray-address", "auto"])
    assert a.executor == "ray" and a.ray_address == "auto"
    assert build_parser().parse_args(["run"]).executor == "local"
    m = build_parser().parse_args(["mitigate", "--quick", "--arms", "bn,ghost", "--executor", "ray"])
    assert m.arms == ["bn", "ghost"] and m.executor == "ray"
