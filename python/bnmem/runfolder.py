"""The run folder: manifest (config + hash + finished stages) and atomic file writes.

Every file a stage produces is written to a temporary name in the same folder and moved into place
with os.replace, so a reader (or a resumed run after kill -9) never sees a partial file.
"""
from __future__ import annotations

import io
import json
import os
import tempfile

import numpy as np
import torch

from .config import Config, from_dict
from .errors import BnmemError

MANIFEST = "manifest.json"


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
        if os.listdir(self.root):
            raise BnmemError(f"--out {self.root} is a non-empty folder without a bnmem manifest; choose an empty "
                             "or new folder")
        from . import __version__
        write_json(mpath, {"bnmem": __version__, "config_hash": cfg.hash(),
                           "config": {**cfg.hashed_dict(), "data_dir": cfg.data_dir}, "stages": {}})
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
            return read_json(mpath)
        except (OSError, ValueError) as exc:
            raise BnmemError(f"{mpath} is unreadable ({exc}); start a new run folder") from None

    def config(self) -> Config:
        return from_dict(self.manifest()["config"])

    def stage_done(self, stage: str) -> bool:
        return stage in self.manifest().get("stages", {})

    def mark_done(self, stage: str, **info) -> None:
        man = self.manifest()
        man.setdefault("stages", {})[stage] = info
        write_json(self.path(MANIFEST), man)
