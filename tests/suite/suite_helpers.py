"""Helpers shared by the suite tests (imported by name: tests/suite is on sys.path under pytest)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bnmem_cmd(*args):
    return [sys.executable, "-m", "bnmem.cli", *args]


def run_cli(*args, timeout=170, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(bnmem_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env, **kw)


# A config small enough for unit tests of the training code (seconds, one process).
MICRO = dict(n_in=60, n_test=40, canaries={"mislabeled": 3, "other_domain": 3, "noise": 3, "near_ood": 3},
             models=4, epochs=2, variants=["bn", "gn"], exact_models=1, exact_points=2, probe_batch=8, width=4,
             batch_size=16, bootstrap=10, workers=1, progress=False,
             fit_target=0.0)   # equal epochs: matched fit would extend these 2-epoch models (test_influence_study)
