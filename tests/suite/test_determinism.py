"""Same seed, same numbers — also when the models are trained by 2 worker processes instead of 1."""
import json

import numpy as np
import torch

from bnmem import pipeline
from bnmem.config import build_config
from bnmem.runfolder import VOLATILE_NPZ_KEYS
from suite_helpers import MICRO

VOLATILE = ("versions", "hardware", "timings")


def _numbers(out):
    res = json.loads((out / "results.json").read_text())
    for k in VOLATILE:
        res.pop(k)
    return res


def test_same_seed_same_numbers(tmp_path):
    logs = []
    a = pipeline.run(build_config(overrides={**MICRO, "workers": 1}), tmp_path / "a", log=logs.append)
    b = pipeline.run(build_config(overrides={**MICRO, "workers": 2}), tmp_path / "b", log=logs.append)
    ra, rb = _numbers(tmp_path / "a"), _numbers(tmp_path / "b")
    assert ra == rb
    for f in ("data.npz", "scores.npz", "logits/bn.npz", "models/bn/m000.npz", "models/gn/m003.npz"):
        za, zb = np.load(a.path(f)), np.load(b.path(f))
        assert za.files == zb.files
        for k in set(za.files) - set(VOLATILE_NPZ_KEYS):  # wall times of the training run
            np.testing.assert_array_equal(za[k], zb[k], err_msg=f"{f}:{k}")
    for m in ("bn/m000.pt", "gn/m002.pt"):
        sa = torch.load(a.path("models", m), weights_only=True)
        sb = torch.load(b.path("models", m), weights_only=True)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (tmp_path / "a" / "examples.csv").read_text() == (tmp_path / "b" / "examples.csv").read_text()
