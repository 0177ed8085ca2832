"""Worker extension (`--worker-extension-cls memserve.serving.worker.MemserveWorkerExtension`):
RPC methods the API server calls through `engine_client.collective_rpc`."""

from __future__ import annotations


class MemserveWorkerExtension:
    def _memserve_runtime(self):
        model = getattr(getattr(self, "model_runner", None), "model", None)
        return getattr(model, "memserve_runtime", None)

    def memserve_routes(self, request_ids: list[str]) -> list[dict | None]:
        """Route of each request (caller-visible or internal id); None when unknown or no memory."""
        runtime = self._memserve_runtime()
        out = []
        for rid in request_ids:
            info = runtime.route_info(rid) if runtime is not None else None
            out.append(None if info is None else info.to_dict())
        return out

    def memserve_info(self) -> dict:
        runtime = self._memserve_runtime()
        if runtime is None:
            return {"edits": 0, "active_requests": 0}
        return {"edits": runtime.memory.num_edits, "method": runtime.memory.method,
                "active_requests": len(runtime.states)}
