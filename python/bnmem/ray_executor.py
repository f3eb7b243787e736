"""Ray executor: the suite's (variant, model index) units of work as Ray tasks, on one machine or a
cluster (`bnmem run --executor ray [--ray-address ADDR]`). Optional extra: `pip install bnmem[ray]`;
ray is imported only when this executor is used.

A drop-in for `executor.Pool`: `RayPool(...).executor()` returns a `concurrent.futures.Executor`
whose `submit(fn, *args)` runs `fn(*args)` as a Ray task, so `executor.parallel_map` (progress bar,
results as they finish, cancel on error) and the stages (`train.train_one`, `query.query_one`) are
used unchanged: the same functions write the same run folder, so the numbers are the local
executor's (each unit is deterministic in (seed, variant, m) and runs on one torch thread).

Failures: a task whose worker process dies (killed, OOM-killed, node lost) is retried by Ray up to
`max_retries` times; so are the exception types in `retry_exceptions` (I/O and memory errors by
default; a deterministic bug is raised at once instead of being retried). A finished model is on
disk the moment its task ends (train_one writes its files atomically), so a retry, a driver crash
or a rerun never loses or retrains it: the stages skip finished units.

Files: by default (`ship_files=False`) the run folder must be on a filesystem every node sees (one
machine, or NFS); tasks read and write it directly. With `ship_files=True` (or "auto": ship only
where a worker does not see the run folder's manifest with the same config hash; this puts every
input file into the object store up front), the task gets the files it reads from the driver
through Ray's object store, runs in a scratch copy of the folder and sends back the files it
wrote, which the driver writes atomically into the run folder before the task counts as done.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import tempfile
import threading

from .errors import BnmemError

DEFAULT_RETRY_EXCEPTIONS = (OSError, MemoryError)


class RunFolderNotVisible(RuntimeError):
    """A Ray worker cannot see the run folder (not retried: it will not appear)."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise BnmemError("--executor ray needs Ray: pip install 'bnmem[ray]' (or pip install 'ray[default]>=2.9')") from None
    return ray


# -- what a unit of work reads (ship_files mode) -------------------------------------------------
def _inputs_for(fn, args) -> list | None:
    """Files (relative to the run folder) that a stage's unit fn(root, cfg_dict, variant[, m]) reads;
    None for a function this module does not know (it then runs on the run folder directly)."""
    import glob
    name = getattr(fn, "__name__", "")
    root, variant = args[0], args[2] if len(args) > 2 else None
    files = ["manifest.json", "data.npz"]
    if name == "train_one":
        return files
    if name == "query_one":
        from .train import model_paths
        return files + [os.path.relpath(model_paths(root, variant, args[3])[0], root)]
    if name == "score_variant":
        models = sorted(glob.glob(os.path.join(root, "models", variant, "m*.npz")))
        return files + ["data.json", os.path.join("logits", f"{variant}.npz")] + \
            [os.path.relpath(p, root) for p in models]
    return None


def _run_unit(fn, args, ship, files_in):
    """Executed in the Ray worker. -> (result, {relative path: bytes written} or None)."""
    import ray
    import torch
    torch.set_num_threads(1)
    files_in = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in files_in.items()} \
        if ship is True else files_in
    root = args[0]
    if ship == "auto":
        man = files_in.get("manifest.json")
        ship = not _same_run_folder(root, ray.get(man) if isinstance(man, ray.ObjectRef) else man)
        if ship:
            files_in = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in files_in.items()}
    if not ship:
        if not os.path.isdir(root):
            import socket
            raise RunFolderNotVisible(f"run folder {root} is not visible on Ray node {socket.gethostname()}: put --out on "
                                    "a filesystem every node mounts, or use RayPool(ship_files=True)")
        return fn(*args), None
    scratch = tempfile.mkdtemp(prefix="bnmem-ray-")
    try:
        for rel, blob in files_in.items():
            p = os.path.join(scratch, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(blob)
        before = set(files_in)
        result = fn(scratch, *args[1:])
        out = {}
        for folder, _, names in os.walk(scratch):
            for n in names:
                rel = os.path.relpath(os.path.join(folder, n), scratch)
                if rel not in before and not n.startswith(".tmp-"):
                    with open(os.path.join(folder, n), "rb") as f:
                        out[rel] = f.read()
        return result, out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _same_run_folder(root, manifest_blob) -> bool:
    import json
    try:
        with open(os.path.join(root, "manifest.json"), "rb") as f:
            here = json.loads(f.read())
        there = json.loads(manifest_blob) if manifest_blob else None
    except (OSError, ValueError):
        return False
    return there is None or here.get("config_hash") == there.get("config_hash")


def _write_back(root, files: dict) -> None:
    """The files a shipped unit wrote, into the run folder; .pt last (a model counts as finished
    when both its .npz and .pt exist, and train_one also writes the .pt last)."""
    from .runfolder import _atomic_bytes
    for rel in sorted(files, key=lambda r: r.endswith(".pt")):
        _atomic_bytes(os.path.join(root, rel), files[rel])


class RayExecutor(cf.Executor):
    """concurrent.futures interface over Ray tasks (used through RayPool)."""

    def __init__(self, pool: "RayPool"):
        self._pool = pool
        self._refs = {}  # future -> ObjectRef, while pending
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn, /, *args, **kwargs):
        if kwargs:
            raise TypeError("RayExecutor.submit takes positional arguments only")
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        ray = self._pool.ray
        root = args[0] if args and isinstance(args[0], str) else None
        files_in = {}
        ship = self._pool.ship_files
        wanted = _inputs_for(fn, args) if (ship is not False and root is not None) else None
        if wanted is None:
            ship = False
        else:
            files_in = {rel: self._pool.blob(os.path.join(root, rel)) for rel in wanted
                        if os.path.exists(os.path.join(root, rel))}
        ref = self._pool.remote.remote(fn, args, ship, files_in)
        self._pool.submitted += 1
        outer = cf.Future()
        outer.set_running_or_notify_cancel()
        with self._lock:
            self._refs[outer] = ref

        def done(inner):
            with self._lock:
                self._refs.pop(outer, None)
            try:
                result, files = inner.result()
                if files:
                    _write_back(root, files)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                outer.set_exception(_unwrap(ray, exc))
                return
            outer.set_result(result)

        ref.future().add_done_callback(done)
        return outer

    def shutdown(self, wait=True, *, cancel_futures=False):
        self._shutdown = True
        if cancel_futures:
            ray = self._pool.ray
            with self._lock:
                pending = list(self._refs.values())
            for ref in pending:
                try:
                    ray.cancel(ref, force=False)
                except Exception:  # noqa: BLE001 - already finished or gone
                    pass


def _unwrap(ray, exc):
    """A task's exception as the original type when Ray can give it (RayTaskError.as_instanceof_cause)."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        try:
            return exc.as_instanceof_cause()
        except Exception:  # noqa: BLE001
            return exc
    return exc


class RayPool:
    """The Ray counterpart of executor.Pool: `with RayPool(address) as pool: run(cfg, out, pool=pool)`.

    address: None starts (or joins) a local Ray instance; "auto" or "ray://host:10001" joins a cluster.
    num_cpus: per task (1: one torch thread per unit, as the local executor); num_gpus per task
    (for --device cuda). max_retries: retries of a unit whose worker died; retry_exceptions: exception
    types that are retried too. ship_files: "auto" | True | False (see the module docstring).
    init_kwargs: extra ray.init arguments (e.g. num_cpus=2 for a local instance). If Ray is already
    initialized (by the caller), it is used as is and not shut down by close().
    """

    def __init__(self, address: str | None = None, *, num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 3,
                 retry_exceptions=DEFAULT_RETRY_EXCEPTIONS, ship_files=False, init_kwargs: dict | None = None):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if ship_files not in ("auto", True, False):
            raise ValueError(f"ship_files must be 'auto', True or False, got {ship_files!r}")
        self.address, self.max_retries, self.ship_files = address, max_retries, ship_files
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.retry_exceptions = list(retry_exceptions) if retry_exceptions else False
        self.init_kwargs = dict(init_kwargs or {})
        self.workers = 0  # interface parity with executor.Pool
        self.submitted = 0  # tasks sent to Ray over this pool's life
        self.ray = None
        self._ex = None
        self._owns_ray = False
        self._reaper = None
        self._blobs = {}

    def blob(self, path):
        """ObjectRef of a file's bytes, put into the object store once per invocation."""
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
        if key not in self._blobs:
            with open(path, "rb") as f:
                self._blobs[key] = self.ray.put(f.read())
        return self._blobs[key]

    def start(self):
        if self.ray is not None:
            return
        ray = import_ray()
        if not ray.is_initialized():
            kw = dict(include_dashboard=False, log_to_driver=False, logging_level="warning")
            kw.update(self.init_kwargs)
            if self.address is None:   # a local instance: reaped with this process (executor.start_reaper)
                from .executor import start_reaper
                self._reaper = start_reaper()
            try:
                ray.init(address=self.address, **kw)
            except (ConnectionError, ValueError) as exc:
                raise BnmemError(f"cannot start/join Ray at {self.address or 'a new local instance'}: {exc}; "
                                 "check --ray-address (e.g. auto, or ray://HEAD:10001)") from None
            self._owns_ray = True
        self.ray = ray
        self.remote = ray.remote(_run_unit).options(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.max_retries,
            retry_exceptions=self.retry_exceptions)

    def executor(self) -> RayExecutor:
        self.start()
        if self._ex is None:
            self._ex = RayExecutor(self)
        return self._ex

    def cluster_cpus(self) -> int:
        self.start()
        return int(self.ray.cluster_resources().get("CPU", 1))

    def close(self):
        if self._ex is not None:
            self._ex.shutdown(cancel_futures=True)
            self._ex = None
        self._blobs.clear()
        if self._owns_ray and self.ray is not None:
            self.ray.shutdown()
        if self._reaper is not None:
            self._reaper.kill()
            self._reaper.wait()
            self._reaper = None
        self.ray, self._owns_ray = None, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_pool(executor: str, *, workers: int = 0, ray_address: str | None = None, **ray_kwargs):
    """`--executor local|ray` -> a pool for pipeline.run(..., pool=...)."""
    if executor == "local":
        from .executor import Pool
        return Pool(workers)
    if executor == "ray":
        if workers == 1:
            raise BnmemError("--workers 1 trains in this process, not on Ray; leave --workers out with --executor ray "
                             "(Ray schedules the units over the cluster's CPUs)")
        return RayPool(ray_address, **ray_kwargs)
    raise BnmemError(f"unknown executor {executor!r}; choose local or ray")
