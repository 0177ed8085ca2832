"""Hot reload: a serving model follows its store's version without a restart.

`StoreWatcher` lives next to the model's `MemoryRuntime` in the worker process and only runs between
engine steps: from the runner hook before each forward (`poll`, at most every `interval` seconds: one
LMDB open + version read, under 1 ms) and from the worker RPCs behind `GET /v1/memserve/status`
(`poll`) and `POST /v1/memserve/reload` (`check(force=True)`). A new version is rebuilt with
`memserve.editor.load_memory` (~50 ms for 24 edits) and handed to `MemoryRuntime.swap`, so requests
already running finish with the memory they started with. A store built for other base weights or
another layer is refused: logged once, reported by `status()`, and the old memory keeps serving.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from .runtime import MemoryRuntime

logger = logging.getLogger("vllm.memserve")  # under "vllm": shown by vLLM's log handler

POLL_ENV = "MEMSERVE_RELOAD_POLL"  # seconds between version checks; unset or 0: only on request


class StoreWatcher:
    """Keeps `runtime` on the current version of the store at `path` (see module doc)."""

    def __init__(self, path: str | os.PathLike, base_weight: torch.Tensor, weight_hash: str, layer: int,
                 runtime: MemoryRuntime, interval: float | None = None):
        self.path = Path(path)
        self.base_weight = base_weight  # fp32 checkpoint weight of the edited down_proj
        self.weight_hash = weight_hash
        self.layer = layer
        self.runtime = runtime
        self.interval = float(os.environ.get(POLL_ENV) or 0) if interval is None else interval
        self.next_poll = time.monotonic() + self.interval
        self.reloads = 0
        self.refused: dict | None = None  # {"version", "reason"} of the last store version refused
        self.error: str | None = None  # why the store could not be read at the last check

    def poll(self) -> None:
        """Check the store if polling is on and the interval has passed."""
        if self.interval <= 0 or time.monotonic() < self.next_poll:
            return
        self.next_poll = time.monotonic() + self.interval
        self.check()

    def check(self, force: bool = False) -> dict:
        """Serve the store's current version if it differs from the served one; `force` also
        re-checks the compatibility of an unchanged or already refused version. Returns `status()`."""
        from memserve.editor import load_memory
        from memserve.store import Store, StoreError

        try:
            with Store.open(self.path) as store:
                version = store.version
                known = version == self.runtime.version or (self.refused or {}).get("version") == version
                if known and not force:
                    return self.status()
                reason = self._incompatibility(store.manifest)
                if reason is not None:
                    self._refuse(version, reason)
                    return self.status()
                self.refused = None
                if version != self.runtime.version:
                    started = time.perf_counter()
                    memory = load_memory(store, self.base_weight)
                    memory.eval()
                    self.runtime.swap(memory, version)
                    self.reloads += 1
                    logger.info("memserve: now serving version %d of %s (%d edits, loaded in %.0f ms)", version,
                                self.path, memory.num_edits, 1000 * (time.perf_counter() - started))
            self.error = None
        except (StoreError, OSError, KeyError, ValueError) as exc:
            if str(exc) != self.error:
                logger.warning("memserve: cannot read store %s, still serving version %s: %s", self.path,
                               self.runtime.version, exc)
            self.error = str(exc)
        return self.status()

    def _incompatibility(self, manifest: dict) -> str | None:
        if manifest.get("weight_hash") != self.weight_hash:
            return (f"store was built for model {manifest.get('model')} (weights {str(manifest.get('weight_hash'))[:12]}), "
                    f"not for the served weights {self.weight_hash[:12]}")
        if int(manifest.get("layer", -1)) != self.layer:
            return f"store edits layer {manifest.get('layer')}, the server serves layer {self.layer}; restart to switch"
        return None

    def _refuse(self, version: int, reason: str) -> None:
        if self.refused != {"version": version, "reason": reason}:
            logger.error("memserve: refused version %d of %s, still serving version %s: %s", version, self.path,
                         self.runtime.version, reason)
        self.refused = {"version": version, "reason": reason}

    def status(self) -> dict:
        runtime = self.runtime
        return {
            "store": str(self.path), "version": runtime.version, "edits": runtime.memory.num_edits,
            "method": runtime.memory.method, "live_requests": len(runtime.states),
            "pinned_memories": runtime.pinned_memories(), "reloads": self.reloads, "poll_seconds": self.interval,
            "refused": self.refused, "error": self.error,
        }
