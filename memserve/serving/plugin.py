"""vLLM plugin entry point, and what an engine serving a store is told.

`register()` (entry point `vllm.general_plugins`, runs in every vLLM process) makes the memserve
architectures known (`model.py`: `Memserve<Base>` for every supported family) and installs prefix
caching with edits (`prefix_cache.py`). An engine selects one through
`hf_overrides={"architectures": ["MemserveLlamaForCausalLM"], "memserve_store": "/path/to/store"}`
(the store may also come from the environment variable `MEMSERVE_STORE`).

`ServingTarget.resolve(store, model)` reads the store's manifest once and derives everything the
engine's options depend on (model directory, its architecture, whether prompts may be chunked);
`serve` and the offline backend both start from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .model import (STORE_CONFIG_KEY, SUPPORTED_ARCHITECTURES, acts_on_all, base_architecture, memserve_architecture,
                    open_store_manifest)

_registered = False
# A config.json without `architectures` (e.g. converted from GGUF) names its family by model_type.
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
               "phi3": "Phi3ForCausalLM"}


class UnsupportedModel(ValueError):
    pass


def register() -> None:
    """vLLM general plugin: make the memserve architectures known, let engines serving a store share
    KV up to each request's routing span (`prefix_cache`), and let pipeline-parallel CPU engines run
    (`runner_hooks.install_pipeline_fix`); idempotent."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from . import prefix_cache
    from .runner_hooks import install_pipeline_fix

    known = ModelRegistry.get_supported_archs()
    for base in SUPPORTED_ARCHITECTURES:
        name = memserve_architecture(base)
        if base in known and name not in known:
            ModelRegistry.register_model(name, f"memserve.serving.model:{name}")
    prefix_cache.install()
    install_pipeline_fix()
    _registered = True


def is_memserve_engine(hf_config) -> bool:
    return any(base_architecture(a) for a in getattr(hf_config, "architectures", None) or [])


@dataclass(frozen=True)
class ServingTarget:
    """What serving a store needs to know, read from its manifest once."""

    store: Path | None  # absolute, not resolved: hot reload follows a symlink that is repointed later
    model_dir: Path
    architecture: str  # the checkpoint's own, e.g. "LlamaForCausalLM"
    acts_on_all: bool  # the memory acts on every token (act_on="all"): prompts must not be chunked

    @classmethod
    def resolve(cls, store: str | os.PathLike | None, model: str | os.PathLike | None = None) -> "ServingTarget":
        """`store` served on `model` (default: the store's own model; without a store, the default model)."""
        from memserve.editor import store_model_dir
        from memserve.models import resolve_model

        opened, manifest = open_store_manifest(str(store) if store else None)
        if opened is None:
            model_dir, on_all = resolve_model(model), False
        else:
            with opened:
                model_dir = resolve_model(model if model is not None else store_model_dir(opened))
                on_all = opened.num_edits > 0 and acts_on_all(manifest)
        config = json.loads((model_dir / "config.json").read_text())
        architecture = (config.get("architectures") or [MODEL_TYPES.get(config.get("model_type"), "?")])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(f"{model_dir}: architecture {architecture} cannot carry a memserve memory; "
                                   f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        return cls(Path(store).absolute() if store else None, model_dir, architecture, on_all)

    def hf_overrides(self) -> dict:
        """`hf_overrides` selecting the memserve model for the store (none: the base model, unchanged)."""
        overrides: dict = {"architectures": [memserve_architecture(self.architecture)]}
        if self.store is not None:
            overrides[STORE_CONFIG_KEY] = str(self.store)
        return overrides
