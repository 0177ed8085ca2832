"""Hot reload: a serving model follows its store without a restart.

`StoreWatcher` lives next to the model's `MemoryRuntime` in the worker process. It compares the
store's *identity* (`Store.identity`: changes with every commit and differs between stores even at
the same version number, e.g. after a symlink is repointed to another store) with the served one:
- from the runner hook before each forward (`poll`, at most every `interval` seconds: one LMDB open
  and four reads, under 1 ms), and from the worker RPCs behind `GET /v1/memserve/status` (`poll`) and
  `POST /v1/memserve/reload` (`check(force=True)`);
- a changed, compatible store is rebuilt with `memserve.editor.load_memory` on a background thread
  (tens of ms at 1,000 edits, seconds at 100,000: never on the step thread, so decoding does not
  stall), and the new memory is handed to `MemoryRuntime.swap` by the next `poll` between steps.
  Requests already running finish with the memory they started with.
A store built for other base weights or another layer is refused: logged once, reported by
`status()`, and the old memory keeps serving. Any error while reading or rebuilding (a moved store, a
damaged file, `lmdb.Error`) is caught and reported as `error`; the old memory keeps serving.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from .runtime import MemoryRuntime

logger = logging.getLogger("vllm.memserve")  # under "vllm": shown by vLLM's log handler

POLL_ENV = "MEMSERVE_RELOAD_POLL"  # seconds between version checks; unset or 0: only on request


class StoreWatcher:
    """Keeps `runtime` on the current content of the store at `path` (see module doc)."""

    def __init__(self, path: str | os.PathLike, base_weight: torch.Tensor, weight_hash: str, layer: int,
                 runtime: MemoryRuntime, identity: str | None = None, interval: float | None = None,
                 agree: Callable[[str | None], bool] | None = None):
        self.path = Path(path)
        self.base_weight = base_weight  # fp32 checkpoint weight of the edited down_proj
        self.weight_hash = weight_hash
        self.layer = layer
        self.runtime = runtime
        self.identity = identity  # `Store.identity` of what the runtime serves
        self.interval = float(os.environ.get(POLL_ENV) or 0) if interval is None else interval
        self.next_poll = time.monotonic() + self.interval
        self.reloads = 0
        self.refusals = 0  # store versions refused (other weights or layer); `refused` is the last one
        self.failures = 0  # checks or rebuilds that failed (`error` is the last one)
        self.refused: dict | None = None  # {"version", "identity", "reason"} of the last store refused
        self.error: str | None = None  # why the store could not be read or rebuilt at the last attempt
        self.load_ms: float | None = None  # duration of the last rebuild (background thread)
        self._loading: dict | None = None  # {"identity", "version", "thread"} of the rebuild under way
        self._ready: tuple | None = None  # (memory, version, identity) built, waiting for `install`
        self._lock = threading.Lock()
        # Tensor parallelism: every rank runs its own watcher, and all must swap at the same step (a
        # request's ranks must serve one memory). `agree(identity of the rebuild ready here, or None)`
        # is a collective true only when every rank has that same rebuild ready.
        self.agree = agree

    # --- step thread -------------------------------------------------------------------------------
    def poll(self) -> None:
        """Between steps: serve a finished rebuild, and check the store if the interval has passed."""
        self.install()
        if self.interval <= 0 or time.monotonic() < self.next_poll:
            return
        self.next_poll = time.monotonic() + self.interval
        self.check()

    def install(self) -> None:
        """Hand a finished rebuild to the runtime (new requests get it; running ones keep theirs)."""
        with self._lock:
            ready = self._ready
        if self.agree is not None and not self.agree(None if ready is None else ready[2]):
            return
        if ready is None:
            return
        with self._lock:
            if self._ready is ready:  # else a newer rebuild finished meanwhile: installed at a later step
                self._ready = None
        memory, version, identity = ready
        self.runtime.swap(memory, version)
        self.identity = identity
        self.reloads += 1
        logger.info("memserve: now serving version %d of %s (%d edits, rebuilt in %.0f ms off the step thread)",
                    version, self.path, memory.num_edits, self.load_ms or 0.0)

    def check(self, force: bool = False) -> dict:
        """Start rebuilding the store's current content if it differs from the served one; `force` also
        re-checks the compatibility of an unchanged or already refused store. Returns `status()`."""
        from memserve.store import Store

        try:
            with Store.open(self.path) as store:
                identity, version, manifest = store.identity(), store.version, store.manifest
            known = identity == self.identity or (self.refused or {}).get("identity") == identity
            if known and not force:
                return self.status()
            reason = self._incompatibility(manifest)
            if reason is not None:
                self._refuse(version, identity, reason)
                return self.status()
            self.refused = None
            self.error = None  # before the rebuild starts: a rebuild failing at once reports its error
            if identity != self.identity:
                self._start_loading(identity, version)
        except Exception as exc:  # noqa: BLE001 - whatever happened to the store, the old memory keeps serving
            self._fail(exc)
        return self.status()

    # --- background rebuild ------------------------------------------------------------------------
    def _start_loading(self, identity: str, version: int) -> None:
        with self._lock:
            if (self._loading and self._loading["identity"] == identity) or (self._ready and self._ready[2] == identity):
                return
            if self._loading:  # an older rebuild is under way: it is installed, then this one starts
                return
            thread = threading.Thread(target=self._load, args=(identity,), name="memserve-reload", daemon=True)
            self._loading = {"identity": identity, "version": version, "thread": thread}
        thread.start()

    def _load(self, identity: str) -> None:
        from memserve.editor import load_memory
        from memserve.store import Store

        started = time.perf_counter()
        try:
            with Store.open(self.path) as store:
                identity, version = store.identity(), store.version  # what is read is what is served
                reason = self._incompatibility(store.manifest)
                memory = None if reason else load_memory(store, self.base_weight)
            if reason:
                self._refuse(version, identity, reason)
                return
            memory.eval()
            self.load_ms = 1000 * (time.perf_counter() - started)
            with self._lock:
                self._ready = (memory, version, identity)
            self.error = None
        except Exception as exc:  # noqa: BLE001 - see check()
            self._fail(exc)
        finally:
            with self._lock:
                self._loading = None

    def wait(self, timeout: float | None = None) -> None:
        """Block until the rebuild under way (if any) has finished (tests and tools; not the step thread)."""
        loading = self._loading
        if loading is not None:
            loading["thread"].join(timeout)

    # --- verdicts ------------------------------------------------------------------------------------
    def _incompatibility(self, manifest: dict) -> str | None:
        if manifest.get("weight_hash") != self.weight_hash:
            return (f"store was built for model {manifest.get('model')} (weights {str(manifest.get('weight_hash'))[:12]}), "
                    f"not for the served weights {self.weight_hash[:12]}")
        if int(manifest.get("layer", -1)) != self.layer:
            return f"store edits layer {manifest.get('layer')}, the server serves layer {self.layer}; restart to switch"
        return None

    def _refuse(self, version: int, identity: str, reason: str) -> None:
        refused = {"version": version, "identity": identity, "reason": reason}
        if self.refused != refused:
            self.refusals += 1
            logger.error("memserve: refused version %d of %s, still serving version %s: %s", version, self.path,
                         self.runtime.version, reason)
        self.refused = refused

    def _fail(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}" if not str(exc).startswith(str(self.path)) else str(exc)
        self.failures += 1
        if message != self.error:
            logger.warning("memserve: cannot read store %s, still serving version %s: %s", self.path,
                           self.runtime.version, message)
        self.error = message

    def status(self) -> dict:
        runtime = self.runtime
        pending = self._loading or (self._ready and {"version": self._ready[1]})  # built, not yet installed
        return {
            "store": str(self.path), "version": runtime.version, "identity": self.identity,
            "edits": runtime.memory.num_edits, "slots": runtime.memory_slots(), "method": runtime.memory.method,
            "live_requests": len(runtime.states), "pinned_memories": runtime.pinned_memories(),
            "reloads": self.reloads, "refusals": self.refusals, "failures": self.failures, "poll_seconds": self.interval, "refused": self.refused, "error": self.error,
            "loading": pending["version"] if pending else None, "last_load_ms": self.load_ms,
            "refused_options": runtime.refused_options,
        }
