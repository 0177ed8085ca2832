"""Worker extension (`--worker-extension-cls memserve.serving.worker.MemserveWorkerExtension`):
RPC methods the API server calls through `engine_client.collective_rpc`."""

from __future__ import annotations


class MemserveWorkerExtension:
    def _memserve(self, name: str):
        """The model's `memserve_runtime` or `memserve_watcher` (None without a memory)."""
        model = getattr(getattr(self, "model_runner", None), "model", None)
        return getattr(model, name, None)

    def memserve_routes(self, request_ids: list[str]) -> list[dict | None]:
        """Route of each request (caller-visible or internal id); None when unknown or no memory."""
        runtime = self._memserve("memserve_runtime")
        out = []
        for rid in request_ids:
            info = runtime.route_info(rid) if runtime is not None else None
            out.append(None if info is None else info.to_dict())
        return out

    def memserve_status(self) -> dict:
        """Served store version, edit count and live routing states (catches up with the store first
        when polling is on, as the next engine step would)."""
        watcher = self._memserve("memserve_watcher")
        if watcher is None:
            return {"store": None, "version": None, "edits": 0, "live_requests": 0, "reload": False}
        watcher.poll()
        return {**watcher.status(), "reload": True}

    def memserve_reload(self) -> dict:
        """Serve the store's current version now (refused if built for other weights); the status."""
        watcher = self._memserve("memserve_watcher")
        if watcher is None:
            return {**self.memserve_status(), "error": "this server cannot reload: it started without a store, "
                    "or on an empty store with prefix caching on; restart it to serve edits"}
        return {**watcher.check(force=True), "reload": True}
