"""The stages data -> train -> probe -> score -> report, each reading and writing the run folder."""
from __future__ import annotations

import time

from . import data as data_stage
from .config import Config
from .runfolder import RunFolder, write_json, write_npz

STAGES = ("data", "train", "probe", "score", "report")


def run(cfg: Config, out: str, *, log=print, pool=None) -> RunFolder:
    rf = RunFolder(out)
    resumed = rf.open_for(cfg)
    if resumed:
        log(f"resuming {rf.root} (config {cfg.hash()}; done: {', '.join(rf.manifest()['stages']) or 'nothing'})")
    t_all = time.perf_counter()
    timings = dict(rf.manifest().get("timings", {}))

    def stage(name, fn):
        if rf.stage_done(name) and name != "report":
            return
        t0 = time.perf_counter()
        info = fn() or {}
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
        return {"trained_now": len(res)}

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
