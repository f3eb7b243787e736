"""The run folder: manifest (config + hash + finished stages + a sha256 of every file a stage
wrote), atomic file writes, and one writer at a time.

Every file a stage produces is written to a temporary name in the same folder and moved into place
with os.replace, so a reader (or a resumed run after kill -9) never sees a partial file. The
manifest's "files" table holds each written file's sha256 and size; a rerun checks them
(`RunFolder.check_files`) and redoes the unit of work of a file that is missing, truncated or
changed instead of using it. `RunFolder.locked()` holds an exclusive flock on `.lock` in the folder
for the whole run: a second process refuses at once, naming the holder's pid; the OS drops the lock
when the holder dies, so the lock file of a killed run never blocks.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

from .config import Config, from_dict
from .errors import BnmemError

MANIFEST = "manifest.json"
LOCK = ".lock"
# files never recorded in the manifest's table: the manifest itself, the lock, temporaries
_UNRECORDED = (MANIFEST, LOCK)


# wall times in a trace: differ between two runs of the same unit
VOLATILE_NPZ_KEYS = ("seconds", "infl_kernel_seconds", "infl_extra_seconds")


def arrays_sha256(path) -> str | None:
    """sha256 of a .npz's arrays (name, dtype, shape, bytes) without VOLATILE_NPZ_KEYS: equal for two
    runs of the same deterministic unit, so a redone file can be compared with the one it replaces.
    None for a file without volatile keys (its file sha256 already compares: np.savez and torch.save
    write the same bytes for the same arrays)."""
    h = hashlib.sha256()
    with np.load(path, allow_pickle=False) as z:
        if not set(VOLATILE_NPZ_KEYS) & set(z.files):
            return None
        for k in sorted(z.files):
            if k in VOLATILE_NPZ_KEYS:
                continue
            a = np.ascontiguousarray(z[k])
            h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj) -> None:
    _atomic_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o)}")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_text(path, text: str) -> None:
    _atomic_bytes(path, text.encode())


def write_npz(path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_bytes(path, buf.getvalue())


def read_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def save_state_dict(path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_bytes(path, buf.getvalue())


def load_state_dict(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_figure(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _atomic_bytes(path, buf.getvalue())


class RunFolder:
    """`--out DIR`: holds manifest.json and every stage's files."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def path(self, *parts) -> str:
        return os.path.join(self.root, *parts)

    # -- creation / resume -------------------------------------------------------------------
    def open_for(self, cfg: Config) -> bool:
        """Create the folder for `cfg`, or check an existing one matches. Returns True on resume."""
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise BnmemError(f"--out {self.root} exists and is not a folder; choose another --out")
        try:
            os.makedirs(self.root, exist_ok=True)
            probe = self.path(".write-test")
            with open(probe, "w") as f:
                f.write("ok")
            os.unlink(probe)
        except OSError as exc:
            raise BnmemError(f"cannot write to --out {self.root} ({exc.strerror}); choose a writable folder") from None
        mpath = self.path(MANIFEST)
        if os.path.exists(mpath):
            man = self.manifest()
            if man.get("config_hash") != cfg.hash():
                old = from_dict(man.get("config", {})).hashed_dict()
                diff = sorted(k for k, v in cfg.hashed_dict().items() if old.get(k) != v)
                raise BnmemError(
                    f"run folder {self.root} holds a run with a different config (hash {man.get('config_hash')} "
                    f"vs {cfg.hash()}; differs in: {', '.join(diff) or 'unknown'}); use a new --out, or rerun "
                    "with the same flags/--config to resume it")
            self._remove_stale_tmp()
            return True
        if [f for f in os.listdir(self.root) if f != LOCK]:
            raise BnmemError(f"--out {self.root} is a non-empty folder without a bnmem manifest; choose an empty "
                             "or new folder")
        from . import __version__
        write_json(mpath, {"bnmem": __version__, "config_hash": cfg.hash(),
                           "config": {**cfg.hashed_dict(), "data_dir": cfg.data_dir}, "stages": {},
                           "files": {}})
        return False

    def _remove_stale_tmp(self) -> None:
        """Temporary files of a killed run (never read; the finished file is moved in whole)."""
        for folder, _, files in os.walk(self.root):
            for f in files:
                if f.startswith(".tmp-"):
                    os.unlink(os.path.join(folder, f))

    def manifest(self) -> dict:
        mpath = self.path(MANIFEST)
        if not os.path.exists(mpath):
            raise BnmemError(f"{self.root} is not a bnmem run folder (no {MANIFEST}); run `bnmem run --out DIR` first")
        try:
            man = read_json(mpath)
        except (OSError, ValueError) as exc:
            raise BnmemError(f"{mpath} is unreadable ({exc}); start a new run folder") from None
        if not isinstance(man, dict) or not isinstance(man.get("config", {}), dict) \
                or not isinstance(man.get("stages", {}), dict) or not isinstance(man.get("files", {}), dict):
            raise BnmemError(f"{mpath} is not a bnmem manifest (a JSON object with config, stages and files tables, "
                             f"got {type(man).__name__}); start a new run folder")
        return man

    def config(self) -> Config:
        return from_dict(self.manifest()["config"])

    def stage_done(self, stage: str) -> bool:
        return stage in self.manifest().get("stages", {})

    def mark_done(self, stage: str, **info) -> None:
        man = self.manifest()
        man.setdefault("stages", {})[stage] = info
        write_json(self.path(MANIFEST), man)

    def unmark(self, *stages) -> None:
        man = self.manifest()
        for st in stages:
            man.setdefault("stages", {}).pop(st, None)
        write_json(self.path(MANIFEST), man)

    # -- one writer ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self):
        """Hold an exclusive lock on the folder (flock on `.lock`) for the block. Raises BnmemError at
        once, naming the holder's pid, when another process holds it. The lock belongs to the open
        file: the OS releases it when this process exits or is killed."""
        import fcntl
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise BnmemError(f"--out {self.root} exists and is not a folder; choose another --out")
        try:
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(self.path(LOCK), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise BnmemError(f"cannot write to --out {self.root} ({exc.strerror}); choose a writable folder") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").split("\n")[0].strip() or "unknown pid"
                raise BnmemError(f"run folder {self.root} is in use by another bnmem process ({holder}); wait for it "
                                 "to finish or stop it, or use another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                          f"{' '.join(sys.argv[:3])}\n".encode(), 0)
            yield self
        finally:
            os.close(fd)   # releases the flock

    # -- integrity -----------------------------------------------------------------------------
    def rel(self, path) -> str:
        return os.path.relpath(os.path.abspath(path), self.root)

    def snapshot(self) -> dict:
        """{relative path: (size, mtime_ns)} of every file in the folder (not temporaries, manifest, lock)."""
        out = {}
        for folder, _, files in os.walk(self.root):
            for f in files:
                if f.startswith(".tmp-") or f.startswith(".write-test"):
                    continue
                p = os.path.join(folder, f)
                rel = os.path.relpath(p, self.root)
                if rel in _UNRECORDED:
                    continue
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def record(self, rels) -> None:
        """Store sha256 and size of these files (relative paths) in the manifest's "files" table."""
        rels = list(rels)
        if not rels:
            return
        entries = {}
        for rel in rels:
            p = self.path(rel)
            entries[rel] = {"sha256": sha256_file(p), "bytes": os.path.getsize(p)}
            if rel.endswith(".npz"):
                try:
                    a = arrays_sha256(p)
                except (OSError, ValueError):
                    a = None
                if a is not None:
                    entries[rel]["arrays_sha256"] = a
        man = self.manifest()
        man.setdefault("files", {}).update(entries)
        write_json(self.path(MANIFEST), man)

    def recorded(self) -> dict:
        return dict(self.manifest().get("files", {}))

    def verify(self, rels=None) -> dict:
        """{relative path: what is wrong} for recorded files (all, or these) that are missing,
        truncated/grown or changed; {} when all are as written."""
        files = self.recorded()
        bad = {}
        for rel in (files if rels is None else rels):
            want = files.get(rel)
            p = self.path(rel)
            if want is None:
                if rels is not None:
                    bad[rel] = "not recorded in the manifest"
                continue
            if not os.path.exists(p):
                bad[rel] = "missing"
                continue
            size = os.path.getsize(p)
            if size != want.get("bytes"):
                bad[rel] = f"{'truncated' if size < want.get('bytes', 0) else 'grown'}: {size} bytes, " \
                           f"{want.get('bytes')} written"
            elif sha256_file(p) != want.get("sha256"):
                bad[rel] = f"changed since it was written (sha256 {want.get('sha256', '')[:12]}... expected)"
        return bad

    def forget(self, rels) -> None:
        """Delete these files (where present) and drop their records."""
        man = self.manifest()
        for rel in rels:
            man.get("files", {}).pop(rel, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(rel))
        write_json(self.path(MANIFEST), man)
