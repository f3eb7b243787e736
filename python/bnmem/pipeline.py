"""The stages data -> train -> probe -> score -> report, each reading and writing the run folder.

One process at a time writes a run folder (RunFolder.locked). Every file a stage writes is recorded
(sha256, size) in the manifest; a resumed run first checks them: a file that is missing, truncated
or changed is reported and only its unit of work is redone (a model: that model's training; a
variant's logits: that variant's probe; data.npz / scores: their stage), never used. A redone file
that comes out different from the one recorded also redoes what was computed from it.
"""
from __future__ import annotations

import os
import re
import time

from . import data as data_stage
from .config import Config
from .errors import BnmemError
from .runfolder import RunFolder, read_npz, write_json, write_npz

STAGES = ("data", "train", "probe", "score", "report")
_MODEL = re.compile(r"^models/([^/]+)/m(\d+)\.(pt|npz)$")
_LOGITS = re.compile(r"^logits/([^/]+)\.npz$")


def run(cfg: Config, out: str, *, log=print, pool=None) -> RunFolder:
    rf = RunFolder(out)
    with rf.locked():
        return _run(rf, cfg, log=log, pool=pool)


def _unit(rel: str):
    """-> (files of rel's unit of work, the first stage that must run again to redo it)."""
    m = _MODEL.match(rel.replace(os.sep, "/"))
    if m:
        base = f"models/{m.group(1)}/m{m.group(2)}"
        return [base + ".npz", base + ".pt"], "train"
    if _LOGITS.match(rel.replace(os.sep, "/")):
        return [rel], "probe"
    if rel in ("data.npz", "data.json"):
        return ["data.npz", "data.json"], "data"
    if rel in ("scores.npz", "results.json"):
        return ["scores.npz", "results.json"], "score"
    return [rel], "report"   # the report's files (re-rendered on every run) and any other stage's


def _loads(path: str) -> bool:
    """An unrecorded file (a run killed between writing it and recording it) is adopted if it loads."""
    try:
        if path.endswith(".pt"):
            from .runfolder import load_state_dict
            load_state_dict(path)
        else:
            read_npz(path)
        return True
    except Exception:  # noqa: BLE001 - any failure to load means: redo it
        return False


def check_integrity(rf: RunFolder, log=print) -> dict:
    """Verify every recorded file; forget (delete) the units of the bad ones and unmark the stages
    that redo them. Returns {relative path: sha256 recorded before} of the files to be redone."""
    bad = rf.verify()
    recorded = rf.recorded()
    for rel in sorted(rf.snapshot()):
        unrec = rel not in recorded and rel not in bad
        if unrec and (_MODEL.match(rel.replace(os.sep, "/")) or _LOGITS.match(rel.replace(os.sep, "/"))):
            if _loads(rf.path(rel)):
                rf.record([rel])
            else:
                bad[rel] = "unreadable (written by a killed run, never recorded)"
    if not bad:
        return {}
    forget, stages, expected, events = set(), set(), {}, []
    for rel, why in sorted(bad.items()):
        files, stage = _unit(rel)
        forget.update(files)
        stages.add(stage)
        for f in files:
            if f in recorded:
                expected[f] = recorded[f].get("arrays_sha256", recorded[f]["sha256"])
        what = {"train": "retraining that model", "probe": "redoing that variant's probe",
                "data": "rebuilding the data", "score": "redoing the score stage",
                "report": "re-rendering the report"}[stage]
        log(f"integrity: {rel} is {why}; not used: {what}")
        events.append(dict(file=rel, problem=why, redo=stage, at=time.strftime("%Y-%m-%d %H:%M:%S")))
    rf.forget(sorted(forget))
    rf.unmark(*stages)
    man = rf.manifest()
    man.setdefault("repairs", []).extend(events)
    write_json(rf.path("manifest.json"), man)
    return expected


def _after_redo(rf: RunFolder, written, expected: dict, log) -> None:
    """A redone file that differs from the one recorded before: redo what was computed from it."""
    rec = rf.recorded()
    for rel in written:
        old = expected.pop(rel, None)
        now = rec.get(rel, {})
        if old is None or now.get("arrays_sha256", now.get("sha256")) == old:
            continue
        rel_u = rel.replace(os.sep, "/")
        if rel_u == "data.npz":
            raise BnmemError(f"{rf.path(rel)} was rebuilt but differs from the one this run's models were trained on "
                             "(the data source changed?); use a new --out")
        m = _MODEL.match(rel_u)
        if m and rel_u.endswith(".npz"):   # a training trace: the scores read it
            log(f"integrity: retrained {rel} differs from the one recorded; redoing the scores")
            rf.unmark("score")
        elif m:
            log(f"integrity: retrained {rel} differs from the one recorded; redoing the {m.group(1)} probe and "
                "the scores")
            rf.forget([f"logits/{m.group(1)}.npz"])
            rf.unmark("probe", "score")
        elif _LOGITS.match(rel_u) or rel_u == "data.json":
            log(f"integrity: redone {rel} differs from the one recorded; redoing the scores")
            rf.unmark("score")


def _run(rf: RunFolder, cfg: Config, *, log=print, pool=None) -> RunFolder:
    resumed = rf.open_for(cfg)
    expected = {}
    if resumed:
        log(f"resuming {rf.root} (config {cfg.hash()}; done: {', '.join(rf.manifest()['stages']) or 'nothing'})")
        expected = check_integrity(rf, log)
    t_all = time.perf_counter()
    timings = dict(rf.manifest().get("timings", {}))

    def stage(name, fn):
        if rf.stage_done(name) and name != "report":
            return
        t0 = time.perf_counter()
        before = rf.snapshot()
        info = fn() or {}
        after = rf.snapshot()
        written = sorted(r for r, st in after.items() if before.get(r) != st)
        rf.record(written)
        _after_redo(rf, written, expected, log)
        dt = time.perf_counter() - t0
        timings[name] = timings.get(name, 0.0) + dt
        rf.mark_done(name, seconds=round(dt, 2), **info)
        log(f"{name}: done in {dt:.1f} s")

    def do_data():
        arrays, meta = data_stage.build(cfg)
        write_npz(rf.path("data.npz"), **arrays)
        write_json(rf.path("data.json"), meta)
        return {"n_candidates": meta["n_candidates"]}

    def do_train():
        from . import train
        res = train.run_stage(rf.root, cfg, progress=cfg.progress, log=log, pool=pool)
        return {"trained_now": len(res), **train.stability_summary(rf.root, cfg)}

    def do_probe():
        from . import query
        query.run_stage(rf.root, cfg, progress=cfg.progress, log=log, pool=pool)

    def do_score():
        from . import score
        score.run_stage(rf.root, cfg, log=log, pool=pool)

    def do_report():
        from . import report
        report.render(rf.root, log=log)

    from .executor import Pool
    stage("data", do_data)
    with (pool if pool is not None else Pool(cfg.workers)) as pool:  # pool: e.g. ray_executor.RayPool
        stage("train", do_train)
        stage("probe", do_probe)
        stage("score", do_score)
    man = rf.manifest()
    man["wall_seconds_last_invocation"] = round(time.perf_counter() - t_all, 2)
    write_json(rf.path("manifest.json"), man)
    stage("report", do_report)
    return rf
