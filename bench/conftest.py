"""Benchmark session setup: record hardware and versions in every run's JSON (machine_info)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "0")  # never time the Triton interpreter


def pytest_benchmark_update_machine_info(config, machine_info):
    from bnmem_kernels import info

    machine_info["bnmem"] = info.collect()
