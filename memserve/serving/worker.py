"""Worker extension (`--worker-extension-cls memserve.serving.worker.MemserveWorkerExtension`):
RPC methods the API server calls through `engine_client.collective_rpc`."""

from __future__ import annotations


class MemserveWorkerExtension:
    def _memserve(self, name: str):
        """The model's `memserve_runtime` or `memserve_watcher` (None without a memory)."""
        model = getattr(getattr(self, "model_runner", None), "model", None)
        return getattr(model, name, None)

    def memserve_routes(self, key: str) -> list[tuple[str, dict | None]] | None:
        """(engine id, route or None when unknown) of every engine request of one HTTP request, by its
        report tag or response id (`MemoryRuntime.response_routes`); None when no memory is attached."""
        runtime = self._memserve("memserve_runtime")
        if runtime is None:
            return None
        return [(rid, None if info is None else info.to_dict()) for rid, info in runtime.response_routes(key)]

    def memserve_status(self) -> dict:
        """Served store version, edit count and live routing states (catches up with the store first
        when polling is on, as the next engine step would)."""
        watcher = self._memserve("memserve_watcher")
        if watcher is None:
            return {"store": None, "version": None, "edits": 0, "live_requests": 0, "reload": False}
        watcher.poll()
        return {**watcher.status(), "reload": True}

    def memserve_metrics(self, top_edits: int) -> dict | None:
        """Counters for the server's `/metrics` (None without a memory)."""
        runtime, watcher = self._memserve("memserve_runtime"), self._memserve("memserve_watcher")
        if runtime is None:
            return None
        status = watcher.status() if watcher is not None else {}
        return {**runtime.metrics(top_edits), "version": runtime.version, "edits": runtime.memory.num_edits,
                "reloads": status.get("reloads", 0), "refusals": status.get("refusals", 0),
                "failures": status.get("failures", 0)}

    def memserve_reload(self) -> dict:
        """Serve the store's current version now (refused if built for other weights); the status."""
        watcher = self._memserve("memserve_watcher")
        if watcher is None:
            return {**self.memserve_status(), "error": "this server cannot reload: it started without a "
                    "store; restart it to serve edits"}
        return {**watcher.check(force=True), "reload": True}
