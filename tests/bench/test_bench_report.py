"""bench/report.py on small synthetic pytest-benchmark JSON: ratios, failure rows, hardware slugs,
scaling plots, README block, and robustness to missing fields and unreadable files."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bnmem_bench_report", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench(name, group, median, extra, peak=None, status=None):
    extra = dict(extra)
    if peak is not None:
        extra["peak_mem_bytes"] = peak
    if status:
        extra.update(status=status, error="ValueError: BatchNorm is not supported")
    stats = {"min": median * 0.9, "max": median * 1.2, "mean": median * 1.05, "stddev": median * 0.1,
             "median": 0.0 if status else median, "rounds": 1 if status else 5, "iterations": 1}
    return {"group": group, "name": name, "fullname": f"bench/test_bench_x.py::{name}", "params": None,
            "param": None, "extra_info": extra, "options": {}, "stats": stats}


def _gpu_run():
    rows = []
    for B in (8, 32, 128):
        g = f"toy B{B}_d16"
        shape = [B, 16]
        rows += [
            _bench(f"test_bnmem[B{B}]", g, 1e-4 * B / 8, {"role": "bnmem", "backend": "cuda", "shape": shape},
                   peak=1000 * B),
            _bench(f"test_e2e[B{B}]", g, 2e-4 * B / 8,
                   {"role": "bnmem", "backend": "auto", "end_to_end": True, "shape": shape}, peak=2000 * B),
            _bench(f"test_loop[B{B}]", g, 8e-3 * B / 8, {"role": "alternative", "name": "autograd loop",
                                                         "shape": shape}, peak=500 * B),
            _bench(f"test_opacus[B{B}] [failed]", g, 0.0, {"role": "alternative", "name": "Opacus",
                                                          "shape": shape}, status="failed"),
        ]
    # robustness: no extra_info, no group, no stats, NaN peak, a role-less row
    rows.append({"name": "test_bare", "fullname": "bench/test_bench_y.py::test_bare", "stats": {"median": 0.5}})
    rows.append({"name": "test_nostats", "fullname": "bench/test_bench_y.py::test_nostats", "group": "lonely",
                 "extra_info": {"role": "alternative", "name": "nostats"}})
    rows.append(_bench("test_nan", "lonely", 0.25, {"role": "alternative", "peak_mem_bytes": float("nan")}))
    mi = {"bnmem": {"gpu": "NVIDIA H200", "torch": "2.11.0", "bnmem_kernels": "0.1.0"},
          "bnmem_hardware": {"cpu_model": "Intel(R) Xeon(R) Platinum 8480+", "cpu_count": 16,
                             "gpu": "NVIDIA H200"}}
    return {"machine_info": mi, "commit_info": {"id": "0123456789abcdef0123", "dirty": True},
            "benchmarks": rows, "datetime": "2026-11-29T09:00:00", "version": "5.2.3"}


def _cpu_run():
    rows = [_bench("test_k", "k B4", 2e-5, {"role": "bnmem", "backend": "cpu", "shape": [4, 3]}, peak=64),
            _bench("test_ref", "k B4", 8e-5, {"role": "bnmem", "backend": "reference", "shape": [4, 3]}, peak=128),
            _bench("test_alt", "k B4", 1e-4, {"role": "alternative", "name": "vmap", "shape": [4, 3]}, peak=4096),
            _bench("test_plain", "k B4", 1e-5, {"role": "baseline", "name": "plain fwd+bwd"}, peak=32),
            _bench("test_loop", "k B4", 1e-3, {"role": "alternative", "name": "loop", "time_scale": 100.0})]
    mi = {"cpu": {"brand_raw": "AMD EPYC 7B13 64-Core Processor"}, "python_version": "3.11.7"}
    return {"machine_info": mi, "benchmarks": rows}


@pytest.fixture
def inputs(tmp_path):
    gpu, cpu = tmp_path / "gpu.json", tmp_path / "cpu.json"
    gpu.write_text(json.dumps(_gpu_run()))
    cpu.write_text(json.dumps(_cpu_run()))
    return gpu, cpu


def test_slugs(report):
    assert report.slugify("Intel(R) Xeon(R) Platinum 8370C CPU @ 2.80GHz") == "intel-xeon-platinum-8370c"
    assert report.slugify("NVIDIA H200") == "nvidia-h200"
    assert report.slugify("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13"
    assert report.hardware_of({"bnmem_hardware": {"cpu_model": "AMD EPYC", "cpu_count": 2}})["slug"] == "amd-epyc-2c"
    assert report.hardware_of({})["slug"] == "unknown"
    assert report.hardware_of(None)["slug"] == "unknown"


def test_report_end_to_end(report, inputs, tmp_path):
    out = tmp_path / "results"
    readme = tmp_path / "README.md"
    readme.write_text("# x\nbefore\n<!-- bench:start -->\nold table\n<!-- bench:end -->\nafter\n")
    assert report.main([str(p) for p in inputs] + ["--out", str(out), "--readme", str(readme)]) == 0

    gpu = json.loads((out / "nvidia-h200.json").read_text())
    cpu = json.loads((out / "amd-epyc-7b13.json").read_text())
    assert gpu["hardware"]["gpu"] == "NVIDIA H200" and cpu["hardware"]["gpu"] is None
    (backend,) = cpu["groups"]["k B4"]["backends"]
    assert backend["backend"] == "bnmem [cpu]" and math.isclose(backend["speedup_vs_reference"], 4.0)
    assert math.isclose(backend["mem_ratio_vs_reference"], 0.5)
    head = [c for c in cpu["groups"]["k B4"]["comparisons"] if c["headline"] and c["alternative"] == "vmap"]
    assert [c["bnmem"] for c in head] == ["bnmem [cpu]"] and math.isclose(head[0]["speedup"], 5.0)
    k_rows = {r["label"]: r for r in cpu["groups"]["k B4"]["rows"]}
    scaled = next(c for c in cpu["groups"]["k B4"]["comparisons"] if c["alternative"].startswith("loop"))
    assert scaled["alternative"] == "loop (subset, time ×100)" and math.isclose(scaled["speedup"], 0.1 / 2e-5)
    assert k_rows["loop (subset, time ×100)"]["median_s"] == 1e-3  # the measured time stays as timed
    assert math.isclose(k_rows["vmap"]["time_vs_baseline"], 10.0)
    assert math.isclose(k_rows["vmap"]["mem_vs_baseline"], 128)
    assert k_rows["plain fwd+bwd"]["time_vs_baseline"] == 1.0
    assert all(r["time_vs_baseline"] is None for r in gpu["groups"]["toy B32_d16"]["rows"])  # no baseline there
    cpu_md = next(out.glob("amd-epyc-7b13.md")).read_text()
    assert "| k B4 | bnmem [cpu] | 20 µs | 80 µs | 4× | 0.5× |" in cpu_md

    g = gpu["groups"]["toy B32_d16"]
    assert [r["role"] for r in g["rows"]][:2] == ["bnmem", "bnmem"]
    heads = [c for c in g["comparisons"] if c["headline"]]
    assert {c["bnmem"] for c in heads} == {"bnmem [auto] end-to-end"}  # end-to-end row is the headline
    loop = next(c for c in heads if c["alternative"] == "autograd loop")
    assert math.isclose(loop["speedup"], 8e-3 * 4 / (2e-4 * 4))
    assert math.isclose(loop["time_ratio"], 1 / loop["speedup"])
    assert math.isclose(loop["mem_ratio"], 2000 / 500) and gpu["time_stat"] == "median"
    kernel = next(c for c in g["comparisons"] if c["bnmem"] == "bnmem [cuda]" and c["alternative"] == "autograd loop")
    assert math.isclose(kernel["speedup"], 80.0) and not kernel["headline"]
    assert g["backends"] == []  # no reference row in this group
    opacus = next(c for c in heads if c["alternative"] == "Opacus")
    assert opacus["alternative_status"] == "failed" and opacus["speedup"] is None
    assert "BatchNorm" in opacus["alternative_error"]

    # robustness rows: present, not compared, no crash
    lonely = {r["label"]: r for r in gpu["groups"]["lonely"]["rows"]}
    assert lonely["nostats"]["status"] == "error" and lonely["nostats"]["median_s"] is None
    assert lonely["test_nan"]["median_s"] == 0.25 and lonely["test_nan"]["peak_mem_bytes"] is None
    bare = gpu["groups"]["(ungrouped) bench/test_bench_y.py"]["rows"][0]
    assert bare["role"] == "unknown" and bare["median_s"] == 0.5

    md = (out / "nvidia-h200.md").read_text()
    assert ("| toy B32_d16 | bnmem [auto] end-to-end | autograd loop | 800 µs | 32 ms | 40× "
            "| 62.5 KiB / 15.6 KiB |") in md
    assert "failed: ValueError: BatchNorm is not supported" in md
    assert "commit 0123456789+dirty" in md

    # plots: the headline bars and one B-scaling family (toy *_d16 with shape [B, 16])
    pngs = sorted(p.name for p in out.glob("nvidia-h200*.png"))
    assert "nvidia-h200-speedup.png" in pngs
    assert [p for p in pngs if p.startswith("nvidia-h200-scaling-B-toy")], pngs
    assert all((out / p).stat().st_size > 1000 for p in pngs)
    assert gpu["plots"] == [p for p in gpu["plots"] if (out / p).exists()]

    text = readme.read_text()
    assert text.startswith("# x\nbefore\n<!-- bench:start -->\n") and text.endswith("<!-- bench:end -->\nafter\n")
    assert "old table" not in text and "NVIDIA H200" in text and "AMD EPYC" in text
    # idempotent: a second run replaces the block again; --stat min uses the fastest round
    assert report.main([str(inputs[1]), "--out", str(out), "--readme", str(readme), "--no-plots", "--stat", "min"]) == 0
    cpu = json.loads((out / "amd-epyc-7b13.json").read_text())
    assert cpu["time_stat"] == "min" and math.isclose(cpu["groups"]["k B4"]["backends"][0]["time_s"], 2e-5 * 0.9)
    assert readme.read_text().count("<!-- bench:start -->") == 1


def test_scaling_families(report):
    run = {"hardware": report.hardware_of({}), "benches": {}, "sources": []}
    for i, b in enumerate(_gpu_run()["benchmarks"]):
        run["benches"][str(i)] = b
    fams = report.scaling_families(report.build_result("x", run), "B")
    assert list(fams) == ["toy d16 [16]"]
    assert [x for x, _, _ in fams["toy d16 [16]"]["autograd loop"]] == [8, 32, 128]
    assert "Opacus" not in fams["toy d16 [16]"]  # failure rows have no points


def test_bad_inputs(report, inputs, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"machine_info": {')  # a run killed while writing
    out = tmp_path / "r"
    assert report.main([str(broken), str(inputs[1]), "--out", str(out), "--no-plots"]) == 1
    assert list(out.glob("*.md")) and "broken.json" in capsys.readouterr().err
    assert report.main([str(broken), "--out", str(out)]) == 2
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    assert report.main([str(inputs[1]), "--out", str(out), "--readme", str(readme), "--no-plots"]) == 2
    assert readme.read_text() == "no markers here\n"
