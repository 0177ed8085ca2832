"""Serving side of memserve: the vLLM plugin, `serve()` (OpenAI server) and the offline vLLM backend.

Importing this package is cheap (vLLM's plugin loader imports `memserve.serving.plugin` in every
vLLM process); vLLM itself is imported only by the functions that need it.
"""

from __future__ import annotations

import os
from typing import Sequence


def serve(store: str | os.PathLike | None, host: str = "127.0.0.1", port: int = 8000, engine_args: Sequence[str] = ()) -> None:
    """Serve `store` through vLLM's OpenAI-compatible server (blocks). See `memserve.serving.server`."""
    from .server import serve as _serve

    _serve(store, host, port, engine_args)


def vllm_backend(store: str | os.PathLike | None, model: str | os.PathLike | None = None, **engine_kwargs):
    """A `VllmEditedModel` (offline `vllm.LLM`) for `memserve eval --backend vllm`."""
    from .offline import VllmEditedModel

    return VllmEditedModel(store, model, **engine_kwargs)


__all__ = ["serve", "vllm_backend"]
