"""Turn pytest-benchmark JSON into bnmem's published results.

    python bench/report.py RESULTS.json [MORE.json ...] --out bench/results/ [--readme README.md]

For each hardware found in the inputs (slug from machine_info: the GPU name, else the CPU model and
core count) it writes into --out:
  <slug>.json   per group: every row (median/min/mean/stddev time in s, rounds, peak memory in bytes,
                `time_s` = the statistic chosen by --stat (median by default) that ratios use,
                role, status, shape, B, device, extra_info) and every bnmem x alternative comparison:
                `time_ratio` = bnmem / alternative (< 1: bnmem is faster), `speedup` = alternative /
                bnmem, `mem_ratio` = bnmem peak / alternative peak;
  <slug>.md     the headline table (group, bnmem row, alternative, times, speedup, memory) and the
                table of all rows, failures included;
  <slug>-speedup.png            headline speedups, one bar per (group, alternative);
  <slug>-scaling-<x>-<family>.png  time and peak memory vs x (B or depth) for each family of groups
                that varies x (see bench/README.md for how a family is found).
With --readme, the block between `<!-- bench:start -->` and `<!-- bench:end -->` in that file is
replaced by the headline table of every <slug>.json in --out (so a GPU run does not erase the CPU
table).

Rows come from bench files that follow bench/README.md (extra_info role = "bnmem" | "alternative",
name/backend, shape, device); anything missing degrades to a plainer row, never to a crash. A row
whose extra_info["status"] is not "ok" (failed / error / skipped, recorded by bench/_harness.py) is
shown with its message and has no ratio.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
import sys
from pathlib import Path

MARK_START = "<!-- bench:start -->"
MARK_END = "<!-- bench:end -->"
SCALING_AXES = ("B", "depth")


# ---------------------------------------------------------------------------------------- helpers
def slugify(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", " ", str(text).lower())
    text = re.sub(r"\b(cpu|processor)\b\s*@.*$", "", text)  # "... CPU @ 2.80GHz"
    text = re.sub(r"@\s*[\d.]+\s*ghz", "", text)
    text = re.sub(r"\b\d+-core\b", "", text)
    text = re.sub(r"\b(processor|cpu)\s*$", "", text.strip())
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return re.sub(r"-+", "-", text) or "unknown"


def _num(value):
    """A finite float, or None."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _ratio(a, b):
    a, b = _num(a), _num(b)
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return a / b


def _short(text: str, limit: int = 120) -> str:
    """A failure message for a table cell: one line, at most `limit` characters (JSON keeps it whole)."""
    text = " ".join(str(text).replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fmt_time(seconds) -> str:
    s = _num(seconds)
    if s is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_bytes(n) -> str:
    n = _num(n)
    if n is None:
        return "—"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def fmt_ratio(r) -> str:
    r = _num(r)
    return "—" if r is None else f"{r:.3g}×"


def _clean(obj):
    """JSON-safe copy: non-finite floats become None (the output is strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


# -------------------------------------------------------------------------------------- hardware
def hardware_of(machine_info) -> dict:
    mi = machine_info if isinstance(machine_info, dict) else {}
    hw = mi.get("bnmem_hardware") if isinstance(mi.get("bnmem_hardware"), dict) else {}
    bn = mi.get("bnmem") if isinstance(mi.get("bnmem"), dict) else {}
    cpuinfo = mi.get("cpu") if isinstance(mi.get("cpu"), dict) else {}
    cpu = (hw.get("cpu_model") or cpuinfo.get("brand_raw") or mi.get("processor") or mi.get("machine")
           or "unknown cpu")
    cpu_count = hw.get("cpu_count") or cpuinfo.get("count")
    gpu = hw.get("gpu") or bn.get("gpu")
    if gpu:
        slug = slugify(gpu)
        title = f"{gpu} (host CPU: {cpu})"
    else:
        slug = slugify(cpu) + (f"-{cpu_count}c" if cpu_count else "")
        title = f"{cpu}" + (f", {cpu_count} cores" if cpu_count else "") + ", no GPU"
    return {"slug": slug, "title": title, "cpu": cpu, "cpu_count": cpu_count, "gpu": gpu,
            "gpu_count": hw.get("gpu_count"), "gpu_mem_bytes": hw.get("gpu_mem_bytes"),
            "mem_total_bytes": hw.get("mem_total_bytes")}


def versions_of(machine_info) -> dict:
    mi = machine_info if isinstance(machine_info, dict) else {}
    bn = mi.get("bnmem") if isinstance(mi.get("bnmem"), dict) else {}
    keys = ("bnmem_kernels", "python", "torch", "torch_cuda", "triton", "extension", "torch_threads",
            "extension_openmp_threads", "platform")
    out = {k: bn.get(k) for k in keys if bn.get(k) is not None}
    out.setdefault("python", mi.get("python_version"))
    return out


# ------------------------------------------------------------------------------------------- rows
def _shape_b(extra: dict):
    b = extra.get("B")
    if b is None:
        shape = extra.get("shape")
        if isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], int):
            b = shape[0]
    return b if isinstance(b, int) else None


def _label(bench: dict, extra: dict, role: str) -> str:
    scale = _num(extra.get("time_scale"))
    label = _plain_label(bench, extra, role)
    return label + (f" (subset, time ×{scale:g})" if scale else "")


def _plain_label(bench: dict, extra: dict, role: str) -> str:
    if extra.get("label"):
        return str(extra["label"])
    if role == "bnmem":
        name = str(extra.get("name") or "")
        label = name if name.lower().startswith("bnmem") else ("bnmem " + name).strip()
        if extra.get("backend"):
            label += f" [{extra['backend']}]"
        if extra.get("end_to_end"):
            label += " end-to-end"
        return label
    if extra.get("name"):
        return str(extra["name"]) + (f" [{extra['backend']}]" if extra.get("backend") else "")
    if extra.get("backend"):
        return str(extra["backend"])
    return re.sub(r"\s*\[(failed|error|skipped)\]$", "", str(bench.get("name") or bench.get("fullname") or "?"))


def row_of(bench: dict) -> dict:
    extra = bench.get("extra_info") if isinstance(bench.get("extra_info"), dict) else {}
    stats = bench.get("stats") if isinstance(bench.get("stats"), dict) else {}
    status = str(extra.get("status") or "ok")
    role = str(extra.get("role") or "unknown")
    fullname = str(bench.get("fullname") or bench.get("name") or "?")
    group = bench.get("group") or f"(ungrouped) {fullname.split('::')[0]}"
    ok = status == "ok" and _num(stats.get("median")) is not None
    if status == "ok" and not ok:
        status, extra = "error", dict(extra, error="no timing in the JSON")
    t = (lambda key: _num(stats.get(key)) if ok else None)
    return {
        "group": str(group),
        "label": _label(bench, extra, role),
        "role": role,
        "status": status,
        "error": extra.get("error"),
        "name": bench.get("name"),
        "fullname": fullname,
        "time_s": None,  # the statistic the ratios use (build_result: median or min)
        "median_s": t("median"), "min_s": t("min"), "mean_s": t("mean"), "stddev_s": t("stddev"),
        "rounds": stats.get("rounds") if ok else None,
        "peak_mem_bytes": _num(extra.get("peak_mem_bytes")) if ok else None,
        "peak_mem_method": extra.get("peak_mem_method"),
        "backend": extra.get("backend"),
        "shape": extra.get("shape"),
        "B": _shape_b(extra),
        "depth": extra.get("depth") if isinstance(extra.get("depth"), int) else None,
        "family": extra.get("family"),
        "device": extra.get("device"),
        "headline": bool(extra.get("headline")),
        "end_to_end": bool(extra.get("end_to_end")),
        "extra_info": extra,
    }


def _unique_labels(rows: list) -> None:
    seen = {}
    for r in rows:
        seen.setdefault(r["label"], []).append(r)
    for label, same in seen.items():
        if len(same) > 1:
            for r in same:
                r["label"] = f"{label} ({r['name'] or r['fullname']})"


def headline_bnmem(rows: list) -> list:
    """The bnmem rows that stand for bnmem in the headline: those marked headline=True; else the
    end-to-end ones (the same work as the alternatives); else every bnmem row but the `reference`
    backend (no cherry-picking of the fastest); else the reference row."""
    ok = [r for r in rows if r["role"] == "bnmem" and r["status"] == "ok"]
    for pick in ([r for r in ok if r["headline"]], [r for r in ok if r["end_to_end"]],
                 [r for r in ok if r["backend"] != "reference"]):
        if pick:
            return pick
    return ok


def add_baseline_ratios(rows: list) -> None:
    """Rows with role "baseline" (e.g. one plain forward+backward): every row's time and peak memory
    as a multiple of the group's first baseline row (`time_vs_baseline`, `mem_vs_baseline`)."""
    base = next((r for r in rows if r["role"] == "baseline" and r["status"] == "ok"), None)
    for r in rows:
        r["time_vs_baseline"] = _ratio(r["time_s"], base["time_s"]) if base else None
        r["mem_vs_baseline"] = _ratio(r["peak_mem_bytes"], base["peak_mem_bytes"]) if base else None


def backend_comparisons(rows: list) -> list:
    """Each bnmem backend row against the group's bnmem `reference` row (the plain-PyTorch definition)."""
    kernel = [r for r in rows if r["role"] == "bnmem" and r["backend"] and not r["end_to_end"]]
    ref = next((r for r in kernel if r["backend"] == "reference" and r["status"] == "ok"), None)
    if ref is None:
        return []
    return [{"backend": r["label"], "status": r["status"], "error": r["error"], "time_s": r["time_s"],
             "reference_time_s": ref["time_s"], "speedup_vs_reference": _ratio(ref["time_s"], r["time_s"]),
             "mem_ratio_vs_reference": _ratio(r["peak_mem_bytes"], ref["peak_mem_bytes"])}
            for r in kernel if r is not ref]


def comparisons(rows: list) -> list:
    heads = {id(r) for r in headline_bnmem(rows)}
    out = []
    bnmem = [r for r in rows if r["role"] == "bnmem" and r["status"] == "ok"]
    for alt in (r for r in rows if r["role"] == "alternative"):
        for b in bnmem:
            out.append({
                "bnmem": b["label"], "alternative": alt["label"], "headline": id(b) in heads,
                "alternative_status": alt["status"], "alternative_error": alt["error"],
                "bnmem_time_s": b["time_s"], "alternative_time_s": alt["time_s"],
                "time_ratio": _ratio(b["time_s"], alt["time_s"]),
                "speedup": _ratio(alt["time_s"], b["time_s"]),
                "bnmem_peak_mem_bytes": b["peak_mem_bytes"], "alternative_peak_mem_bytes": alt["peak_mem_bytes"],
                "mem_ratio": _ratio(b["peak_mem_bytes"], alt["peak_mem_bytes"]),
            })
        if not bnmem:  # an alternative with nothing to compare to is still listed
            out.append({"bnmem": None, "alternative": alt["label"], "headline": True,
                        "alternative_status": alt["status"], "alternative_error": alt["error"],
                        "bnmem_time_s": None, "alternative_time_s": alt["time_s"],
                        "time_ratio": None, "speedup": None, "bnmem_peak_mem_bytes": None,
                        "alternative_peak_mem_bytes": alt["peak_mem_bytes"], "mem_ratio": None})
    return out


# ---------------------------------------------------------------------------------------- loading
def load_runs(paths: list) -> tuple[dict, list]:
    """{slug: {"hardware", "versions", "machine_info", "sources", "benches": {fullname: bench}}}, errors."""
    runs, errors = {}, []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            if not isinstance(data, dict):
                raise ValueError("not a pytest-benchmark JSON object")
        except (OSError, ValueError) as exc:
            errors.append(f"{path}: {exc}")
            continue
        mi = data.get("machine_info") or {}
        hw = hardware_of(mi)
        run = runs.setdefault(hw["slug"], {"hardware": hw, "benches": {}, "sources": []})
        run.update(hardware=hw, versions=versions_of(mi), machine_info=mi)
        commit = data.get("commit_info") if isinstance(data.get("commit_info"), dict) else {}
        run["sources"].append({"path": str(path), "datetime": data.get("datetime"),
                               "commit": commit.get("id"), "dirty": commit.get("dirty")})
        for bench in data.get("benchmarks") or []:
            if isinstance(bench, dict):  # a later file's row replaces an earlier one of the same test
                run["benches"][str(bench.get("fullname") or bench.get("name"))] = bench
    return runs, errors


def _slim(machine_info) -> dict:
    """machine_info without py-cpuinfo's long CPU flag list."""
    mi = dict(machine_info) if isinstance(machine_info, dict) else {}
    if isinstance(mi.get("cpu"), dict):
        mi["cpu"] = {k: v for k, v in mi["cpu"].items() if k != "flags"}
    return mi


def build_result(slug: str, run: dict, stat: str = "median") -> dict:
    rows = [row_of(b) for b in run["benches"].values()]
    for r in rows:
        scale = _num(r["extra_info"].get("time_scale"))
        r["time_scale"] = scale
        r["time_s"] = r[f"{stat}_s"] * scale if scale and r[f"{stat}_s"] is not None else r[f"{stat}_s"]
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    result_groups = {}
    for name in sorted(groups):
        g = sorted(groups[name], key=lambda r: (r["role"] != "bnmem", r["status"] != "ok",
                                                r["time_s"] if r["time_s"] is not None else math.inf))
        _unique_labels(g)
        add_baseline_ratios(g)
        result_groups[name] = {"rows": g, "comparisons": comparisons(g), "backends": backend_comparisons(g)}
    return {
        "schema": 1,
        "slug": slug,
        "hardware": run["hardware"],
        "versions": run.get("versions", {}),
        "time_stat": stat,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sources": run["sources"],
        "machine_info": _slim(run.get("machine_info", {})),
        "groups": result_groups,
        "plots": [],
    }


# --------------------------------------------------------------------------------------- markdown
def headline_table(result: dict) -> str:
    lines = ["| group | bnmem | alternative | bnmem time | alternative time | speedup (alt ÷ bnmem) "
             "| peak mem bnmem / alt |", "|---|---|---|---|---|---|---|"]
    n = 0
    for group, g in result["groups"].items():
        for c in g["comparisons"]:
            if not c["headline"]:
                continue
            n += 1
            if c["alternative_status"] != "ok":
                alt_time = _short(f"{c['alternative_status']}: {c['alternative_error'] or ''}".strip())
                speed = mem = "—"
            else:
                alt_time = fmt_time(c["alternative_time_s"])
                speed = fmt_ratio(c["speedup"])
                mem = (f"{fmt_bytes(c['bnmem_peak_mem_bytes'])} / {fmt_bytes(c['alternative_peak_mem_bytes'])}"
                       if c["bnmem_peak_mem_bytes"] is not None or c["alternative_peak_mem_bytes"] is not None
                       else "—")
            lines.append("| " + " | ".join(_cell(x) for x in (
                group, c["bnmem"] or "(no bnmem row)", c["alternative"], fmt_time(c["bnmem_time_s"]),
                alt_time, speed, mem)) + " |")
    if not n:
        lines.append("| (no group with both a bnmem row and an alternative) | | | | | | |")
    return "\n".join(lines)


def backends_table(result: dict) -> str:
    lines = ["| group | backend | time | reference time | speedup vs reference | peak mem ÷ reference |",
             "|---|---|---|---|---|---|"]
    for group, g in result["groups"].items():
        for c in g.get("backends", []):
            time = fmt_time(c["time_s"]) if c["status"] == "ok" else _short(f"{c['status']}: {c['error'] or ''}")
            lines.append("| " + " | ".join(_cell(x) for x in (
                group, c["backend"], time, fmt_time(c["reference_time_s"]), fmt_ratio(c["speedup_vs_reference"]),
                fmt_ratio(c["mem_ratio_vs_reference"]))) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def rows_table(result: dict) -> str:
    lines = ["| group | row | role | status | median | min | stddev | rounds | peak mem | time, mem ÷ baseline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for group, g in result["groups"].items():
        for r in g["rows"]:
            status = r["status"] if r["status"] == "ok" else _short(f"{r['status']}: {r['error'] or ''}")
            lines.append("| " + " | ".join(_cell(x) for x in (
                group, r["label"], r["role"], status, fmt_time(r["median_s"]), fmt_time(r["min_s"]),
                fmt_time(r["stddev_s"]), r["rounds"] if r["rounds"] is not None else "—",
                fmt_bytes(r["peak_mem_bytes"]),
                "—" if r.get("time_vs_baseline") is None and r.get("mem_vs_baseline") is None
                else f"{fmt_ratio(r.get('time_vs_baseline'))}, {fmt_ratio(r.get('mem_vs_baseline'))}")) + " |")
    return "\n".join(lines)


def _short_commit(commit) -> str:
    commit = str(commit or "")
    return commit[:10] if re.fullmatch(r"[0-9a-f]{11,40}", commit) else commit


def _provenance(result: dict) -> str:
    v = result.get("versions", {})
    bits = [f"{k} {v[k]}" for k in ("bnmem_kernels", "torch", "torch_cuda", "triton", "python") if v.get(k)]
    if v.get("torch_threads"):
        bits.append(f"{v['torch_threads']} intra-op threads")
    commits = sorted({_short_commit(s.get("commit")) + ("+dirty" if s.get("dirty") else "")
                      for s in result.get("sources", []) if s.get("commit")})
    dates = sorted(s["datetime"] for s in result.get("sources", []) if s.get("datetime"))
    out = ", ".join(bits)
    if commits:
        out += f"; commit {', '.join(commits)}"
    if dates:
        out += f"; run {dates[-1][:19]} UTC"
    return out


def markdown(result: dict) -> str:
    parts = [f"# bnmem benchmarks: {result['hardware']['title']}", "",
             _provenance(result), "",
             f"Times in the comparisons are the {result.get('time_stat', 'median')} over each benchmark's "
             "rounds; peak memory is the most bytes allocated above "
             "the call's starting point during one extra untimed call (GPU: torch.cuda.max_memory_allocated; "
             "CPU: torch's CPU allocator via the profiler). Speedup = alternative time ÷ bnmem time "
             "(> 1: bnmem is faster). The headline bnmem row of a group is the one marked headline, else "
             "its end-to-end rows (same work as the alternatives), else all its rows but the reference backend. "
             "A row with role `baseline` (e.g. a plain forward+backward) gives every row of its group a "
             "time and memory multiple.", "",
             "## bnmem vs alternatives", "", headline_table(result), ""]
    if backends_table(result):
        parts += ["## bnmem backends vs the reference implementation", "", backends_table(result), ""]
    parts += ["## All rows", "", rows_table(result)]
    if result.get("plots"):
        parts += ["", "## Plots", ""] + [f"![{p}]({p})" for p in result["plots"]]
    return "\n".join(parts) + "\n"


def readme_block(results: list) -> str:
    parts = []
    for res in sorted(results, key=lambda r: r["slug"]):
        parts += [f"**{res['hardware']['title']}** ({_provenance(res)}; all rows: "
                  f"[bench/results/{res['slug']}.md](bench/results/{res['slug']}.md))", "",
                  headline_table(res), ""]
    return "\n".join(parts).strip() + "\n" if parts else "(no benchmark results yet)\n"


def replace_block(text: str, block: str) -> str:
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"markers {MARK_START} ... {MARK_END} not found (in that order)")
    return text[:start + len(MARK_START)] + "\n" + block + text[end:]


# ------------------------------------------------------------------------------------------ plots
def _family(row: dict, axis: str):
    if row["family"]:
        return str(row["family"])
    if axis == "B":
        base = re.sub(r"\bB\d+_?", "", row["group"])
        shape = row["shape"] if isinstance(row["shape"], (list, tuple)) else []
        rest = "x".join(str(s) for s in list(shape)[1:])
        return " ".join(base.replace("__", "_").split()).strip(" _-") + (f" [{rest}]" if rest else "")
    base = re.sub(r"\b(depth|D)\s*=?\s*\d+", "", row["group"])
    return " ".join(base.split()).strip(" _-")


def scaling_families(result: dict, axis: str) -> dict:
    """{family: {label: [(x, time_s, peak_mem_bytes), ...]}} for families where some row varies x."""
    fams = {}
    for g in result["groups"].values():
        for r in g["rows"]:
            if r["status"] != "ok" or r[axis] is None:
                continue
            fams.setdefault(_family(r, axis), {}).setdefault(r["label"], []).append(
                (r[axis], r["time_s"], r["peak_mem_bytes"]))
    return {f: {lab: sorted(pts) for lab, pts in series.items()} for f, series in fams.items()
            if any(len({x for x, _, _ in pts}) >= 2 for pts in series.values())}


def write_plots(result: dict, out: Path) -> list:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # plots are optional: tables and JSON do not need them
        print(f"report: no plots ({exc})", file=sys.stderr)
        return []
    slug, written = result["slug"], []
    for stale in [out / f"{slug}-speedup.png", *out.glob(f"{slug}-scaling-*.png")]:  # from an earlier run
        stale.unlink(missing_ok=True)
    pairs = [(g, c) for g, grp in result["groups"].items() for c in grp["comparisons"]
             if c["headline"] and c["speedup"] is not None]
    if pairs:
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(pairs) + 1.4))
        labels = [f"{g}: {c['alternative']}" for g, c in pairs]
        vals = [c["speedup"] for _, c in pairs]
        ax.barh(range(len(pairs)), vals, color=["tab:green" if v >= 1 else "tab:red" for v in vals])
        ax.set_yticks(range(len(pairs)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.3g}×", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_xlabel("speedup of bnmem (alternative time ÷ bnmem time, log)")
        ax.set_title(f"bnmem vs alternatives — {result['hardware']['title']}", fontsize=9)
        fig.tight_layout()
        name = f"{slug}-speedup.png"
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)
    for axis in SCALING_AXES:
        for family, series in sorted(scaling_families(result, axis).items()):
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
            for i, (label, pts) in enumerate(sorted(series.items())):
                color = f"C{i % 10}"
                xs = [p[0] for p in pts]
                ax_t.plot(xs, [p[1] for p in pts], marker="o", label=label, color=color)
                mem = [(x, m) for x, _, m in pts if m is not None and m > 0]
                if mem:
                    ax_m.plot([x for x, _ in mem], [m / 2 ** 20 for _, m in mem], marker="o", label=label,
                              color=color)
            for ax, ylabel in ((ax_t, f"{result.get('time_stat', 'median')} time (s)"), (ax_m, "peak memory (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("batch size B" if axis == "B" else axis)
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
            ax_t.legend(fontsize=7)
            fig.suptitle(f"{family} — {result['hardware']['title']}", fontsize=9)
            fig.tight_layout()
            name = f"{slug}-scaling-{axis}-{slugify(family)[:60]}.png"
            fig.savefig(out / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(name)
    return written


# -------------------------------------------------------------------------------------------- cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="pytest-benchmark JSON files (--benchmark-json=...)")
    ap.add_argument("--out", default="bench/results", help="folder for <slug>.json/.md/.png")
    ap.add_argument("--readme", help="file whose bench:start/bench:end block gets the headline tables")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="time statistic the ratios and plots use (min resists a loaded machine's noise)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)

    runs, errors = load_runs(args.results)
    for e in errors:
        print(f"report: skipped {e}", file=sys.stderr)
    if not runs:
        print("report: no readable results", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for slug, run in sorted(runs.items()):
        result = build_result(slug, run, args.stat)
        if not args.no_plots:
            result["plots"] = write_plots(result, out)
        (out / f"{slug}.json").write_text(json.dumps(_clean(result), indent=1, default=str, allow_nan=False) + "\n")
        (out / f"{slug}.md").write_text(markdown(result))
        n_rows = sum(len(g["rows"]) for g in result["groups"].values())
        n_bad = sum(r["status"] != "ok" for g in result["groups"].values() for r in g["rows"])
        print(f"report: {out / slug}.json/.md: {len(result['groups'])} groups, {n_rows} rows "
              f"({n_bad} not ok), {len(result['plots'])} plots")
    if args.readme:
        results = []
        for p in sorted(out.glob("*.json")):
            try:
                res = json.loads(p.read_text())
            except ValueError:
                continue
            if isinstance(res, dict) and res.get("schema") == 1 and "groups" in res:
                results.append(res)
        path = Path(args.readme)
        try:
            path.write_text(replace_block(path.read_text(), readme_block(results)))
        except (OSError, ValueError) as exc:
            print(f"report: README not updated: {path}: {exc}", file=sys.stderr)
            return 2
        print(f"report: {path}: bench block updated ({len(results)} hardware tables)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
