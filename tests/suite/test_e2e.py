"""End to end: `bnmem run --quick` produces every output, sane; `bnmem report` re-renders; a rerun
resumes without retraining; a different config in the same folder is refused."""
import csv
import json
import math
import os

import numpy as np

from bnmem.report import FIGURES

from suite_helpers import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_outputs_present_and_sane(quick_run):
    out, seconds, proc = quick_run
    assert seconds < 90, f"--quick took {seconds:.0f} s"  # budget < 60 s; slack for a loaded shared CI box
    for f in ("manifest.json", "data.npz", "data.json", "scores.npz", "results.json", "examples.csv",
              "report.md") + FIGURES:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    for f in FIGURES:
        blob = (out / f).read_bytes()
        assert blob[:8] == PNG_MAGIC and len(blob) > 5000, f  # a real image, not an empty canvas
    man = json.loads((out / "manifest.json").read_text())
    assert set(man["stages"]) == {"data", "train", "probe", "score", "report"}
    res = json.loads((out / "results.json").read_text())
    assert res["config_hash"] == man["config_hash"]
    assert res["hardware"]["cores"] >= 1 and "torch" in res["versions"]["bnmem_kernels"]
    variants = res["config"]["variants"]
    assert list(res["variants"]) == variants
    n = res["data"]["n_candidates"]
    for v in variants:
        r = res["variants"][v]
        assert len(r["test_acc"]) == res["config"]["models"]
        assert all(0.15 < a <= 1 for a in r["test_acc"]), r["test_acc"]  # better than chance (10 classes)
        assert ("train" in r["modes"]) == (v.startswith("bn"))
        for q, qr in r["modes"].items():
            for a in res["attacks"]:
                m = qr["attacks"][a]["overall"]
                assert 0 <= m["auc"] <= 1 and 0 <= m["tpr@0.01"] <= 1 and 0 <= m["tpr@0.001"] <= m["tpr@0.01"]
                assert m["n_members"] + m["n_nonmembers"] == res["config"]["models"] * n - qr["attacks"][a]["nan_scores"]
            p = qr["attacks"][res["primary_attack"]]["overall"]
            assert p["auc_ci"][0] <= p["auc"] <= p["auc_ci"][1]
            for g, mm in qr["memorization"].items():
                assert -1 <= mm["mean"] <= 1 and mm["ci"][0] <= mm["ci"][1]
        gn = r["gradnorms"]
        for g, traj in gn["trajectory"].items():
            # matched fit: the longest-trained model's epochs (equal epochs: the config's)
            assert len(traj) == r["fit"]["epochs_max"] and all(t > 0 and math.isfinite(t) for t in traj)
        assert res["config"]["fit_target"] == 0 or r["fit"]["epochs_max"] <= res["config"]["fit_max_epochs"]
        assert r["influence"]["recorded"] and r["influence"]["phases"]["all"]["ratio/ood"]["value"] > 0
        assert all(x["ratio"] > 0 for x in gn["ratio_vs_in_dist"].values())
        gaps = gn["exact_gap"]["vs_exact"]
        if not v.startswith("bn"):  # without BN the four definitions coincide
            for mode in ("column", "detached", "eval"):
                assert gaps[mode]["max_rel_diff"] < 1e-3, (v, mode, gaps[mode])
    assert "bn - gn" in res["comparisons"] and res["comparisons"]["bn - gn"]
    rows = list(csv.DictReader((out / "examples.csv").open()))
    assert len(rows) == n
    assert {r["group"] for r in rows} == set(res["groups"]) - {"ood"}  # "ood" = all canary kinds pooled
    assert all(-1 <= float(r["mem_bn"]) <= 1 for r in rows)
    sc = np.load(out / "scores.npz")
    assert sc[f"bn__eval__{res['primary_attack']}"].shape == (res["config"]["models"], n)
    md = (out / "report.md").read_text()
    for section in ("## Accuracy", "## (iii) Membership inference", "## (i) Memorization", "## (ii) Per-sample gradient",
                    "## Did BatchNorm amplify", "## Fit: matched-fit protocol", "## Per-step influence",
                    "## Is it the coupling?"):
        assert section in md
    assert "bn vs gn" in md and "nan" not in md.lower().replace("nan_", "")


def test_report_rerenders(quick_run, tmp_path):
    out, _, _ = quick_run
    before = (out / "report.md").read_text()
    os.remove(out / "roc.png")
    proc = run_cli("report", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "roc.png").is_file() and (out / "report.md").read_text() == before


def test_rerun_resumes_without_retraining(quick_run):
    out, _, _ = quick_run
    pts = sorted((out / "models").rglob("*.pt"))
    mtimes = {p: p.stat().st_mtime_ns for p in pts}
    proc = run_cli("run", "--quick", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in pts} == mtimes


def test_different_config_refused(quick_run):
    out, _, _ = quick_run
    proc = run_cli("run", "--quick", "--out", str(out), "--seed", "1")
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "different config" in err and "seed" in err
