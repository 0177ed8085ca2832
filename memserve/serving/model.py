"""vLLM causal LMs with a memserve memory on one down-projection, for every supported family.

`with_memory(base_cls)` derives, from any vLLM model class whose decoder layers end their MLP in a
`down_proj` `RowParallelLinear` (`model.layers[i].mlp.down_proj`), the class `Memserve<Base>`. After
the base weights are loaded it rebuilds the memory from the store with
`memserve.editor.load_memory` (the same memory object and routing code as the transformers
reference path), checks the store was built on these weights, and wraps the down-projection in
`RowParallelLinearWithMemory`. The classes are registered with vLLM by `plugin.register()` and built
lazily by this module's `__getattr__` (vLLM's registry imports them by name).
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

import torch

from .layers import RowParallelLinearWithMemory, split_graphs_at_routing
from .runner_hooks import install_runner_hooks
from .runtime import MemoryRuntime

logger = logging.getLogger("vllm.memserve")  # under "vllm": shown by vLLM's log handler

# vLLM architectures a memory can be attached to: each keeps its MLPs at `model.layers[i].mlp` with a
# row-parallel `down_proj`, and its checkpoints name that weight `model.layers.{i}.mlp.down_proj.weight`.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
)
PREFIX = "Memserve"
STORE_ENV = "MEMSERVE_STORE"
STORE_CONFIG_KEY = "memserve_store"
# Part of vLLM's compile-cache hash (`additional_config`) when a memory is attached: the wrapped graph
# and the plain one must never be served from each other's cache entry (vLLM's hash ignores
# `hf_overrides`, which is where the store is named). Bump when the wrapper's graph changes.
GRAPH_REVISION = 3  # 2: the wrapper keeps the base layer as `base_layer`; 3: two ops (route, apply)
COMPILE_CACHE_KEY = "memserve_memory"


class StoreWeightMismatch(RuntimeError):
    pass


def memserve_architecture(base: str) -> str:
    """`LlamaForCausalLM` -> `MemserveLlamaForCausalLM` (the name `hf_overrides` selects)."""
    return PREFIX + base


def base_architecture(architecture: str) -> str | None:
    """The wrapped family of a memserve architecture name; None for any other name."""
    base = architecture[len(PREFIX):] if architecture.startswith(PREFIX) else None
    return base if base in SUPPORTED_ARCHITECTURES else None


def store_path_from(hf_config) -> str | None:
    path = getattr(hf_config, STORE_CONFIG_KEY, None) or os.environ.get(STORE_ENV)
    return str(path) if path else None


def open_store_manifest(path: str | None):
    """(store, manifest) or (None, None) when there is no store at `path`."""
    if not path:
        return None, None
    from memserve.store import Store

    if not Store.exists(path):
        return None, None
    # Not readonly=True: Store.open(readonly=True) currently fails (lmdb drops dbi handles opened inside
    # a read-only txn); a normal open only takes the write lock briefly. Nothing is written.
    store = Store.open(path)
    return store, store.manifest


def acts_on_all(manifest: dict) -> bool:
    """The store's memory acts on every token (`act_on="all"`): prompts must not be chunked and their
    KV depends on the route."""
    return manifest.get("config", {}).get("act_on", "answer") == "all"


def down_proj_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.down_proj.weight"


def with_memory(base_cls: type) -> type:
    """`base_cls` (a vLLM causal LM) with a memserve memory attached after its weights load."""

    class MemoryModel(base_cls):
        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            self.memserve_runtime: MemoryRuntime | None = None
            self.memserve_watcher = None  # reload.StoreWatcher, set with the runtime
            self._memserve_store = store_path_from(vllm_config.model_config.hf_config)
            self._memserve_vllm_config = vllm_config

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            store, manifest = open_store_manifest(self._memserve_store)
            if store is None:
                logger.info("memserve: no store at %s; serving the base model unchanged", self._memserve_store)
                return super().load_weights(weights)
            layer = int(manifest["layer"])
            target = down_proj_name(layer)
            captured: dict[str, torch.Tensor] = {}

            def watch(items):
                for name, tensor in items:
                    if name == target:
                        captured["w"] = tensor.detach().to("cpu", torch.float32).clone()
                    yield name, tensor

            loaded = super().load_weights(watch(weights))
            try:
                if owns_layer(self, layer):
                    attach_memory(self, self._memserve_vllm_config, store, manifest, layer, captured.get("w"))
                else:
                    logger.info("memserve: layer %d lives on another pipeline stage; no memory here", layer)
            finally:
                store.close()
            return loaded

    name = memserve_architecture(base_cls.__name__)
    MemoryModel.__name__ = MemoryModel.__qualname__ = name
    MemoryModel.__doc__ = f"{base_cls.__name__} with a memserve memory on one down-projection."
    return MemoryModel


def owns_layer(model, layer: int) -> bool:
    """Whether this pipeline stage holds decoder layer `layer` (the others are placeholders)."""
    inner = model.model
    start, end = getattr(inner, "start_layer", 0), getattr(inner, "end_layer", len(inner.layers))
    return start <= layer < end


def attach_memory(model, vllm_config, store, manifest: dict, layer: int, checkpoint_weight: torch.Tensor | None) -> None:
    """Rebuild the store's memory on `model.layers[layer].mlp.down_proj` (refusing other weights)."""
    from memserve.editor import load_memory
    from memserve.models import weight_hash
    from .prefix_cache import chat_format
    from .reload import StoreWatcher

    mlp = model.model.layers[layer].mlp
    if checkpoint_weight is None:  # e.g. a loader that renamed the tensor: use what was loaded
        checkpoint_weight = mlp.down_proj.weight.detach().to("cpu", torch.float32).clone()
    digest = weight_hash(checkpoint_weight)
    if digest != manifest["weight_hash"]:
        raise StoreWeightMismatch(
            f"memserve: store {store.path} was built for model {manifest['model']} (layer {layer} "
            f"weights {manifest['weight_hash'][:12]}), but the loaded weights hash to {digest[:12]}; "
            "serve it with the model it was edited on"
        )
    memory = load_memory(store, checkpoint_weight)
    memory.eval()
    # Per-token buffers live on the model's device, sized for the largest forward; the dense delta path
    # follows from the device (see runtime.TokenInputs). The memory's state stays on the host, where
    # routing runs; what the delta reads is copied to the activations' device (`EditMemory.served`).
    shard, gather, agree = tensor_parallel_hooks(mlp.down_proj)
    runtime = MemoryRuntime(memory, chat_format(vllm_config.model_config.tokenizer), version=store.version,
                            device=mlp.down_proj.weight.device,
                            max_tokens=vllm_config.scheduler_config.max_num_batched_tokens, shard=shard, gather=gather)
    model.memserve_watcher = StoreWatcher(store.path, checkpoint_weight, digest, layer, runtime,
                                          identity=store.identity(), agree=agree)
    mlp.down_proj = RowParallelLinearWithMemory(mlp.down_proj, runtime)
    model.memserve_runtime = runtime
    mark_compile_cache(vllm_config, layer)
    split_graphs_at_routing(vllm_config.compilation_config)
    install_runner_hooks()
    logger.info("memserve: %s memory with %d edits on layer %d from %s", manifest["method"], memory.num_edits,
                layer, store.path)


def tensor_parallel_hooks(down_proj):
    """Under tensor parallelism (none: three Nones): the features [start, end) of the down-projection
    input this rank holds, the all-gather of prompt statistics along the features, and the agreement
    of the ranks' store watchers on which rebuild to install (see `reload.StoreWatcher.agree`)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    if get_tensor_model_parallel_world_size() == 1:
        return None, None, None
    import hashlib

    import torch.distributed as dist
    from vllm.distributed import get_tp_group, tensor_model_parallel_all_gather

    width = down_proj.input_size_per_partition
    start = get_tensor_model_parallel_rank() * width
    group = get_tp_group().cpu_group

    def gather(stats: torch.Tensor) -> torch.Tensor:
        return tensor_model_parallel_all_gather(stats.contiguous(), dim=-1)

    def agree(identity: str | None) -> bool:
        code = 0 if identity is None else int.from_bytes(hashlib.blake2b(identity.encode(), digest_size=7).digest(), "little")
        extremes = torch.tensor([code, -code], dtype=torch.int64)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
        return int(extremes[0]) == code and int(extremes[1]) == -code

    return (start, start + width), gather, agree


def mark_compile_cache(vllm_config, layer: int) -> None:
    """Make vLLM's compile-cache hash tell the wrapped model from the plain one (see GRAPH_REVISION).
    Called before the first forward, which is when vLLM hashes the config for its compile cache."""
    extra = vllm_config.additional_config
    if isinstance(extra, dict):
        extra[COMPILE_CACHE_KEY] = {"graph": GRAPH_REVISION, "layer": layer}
    else:  # a platform's own SupportsHash object: leave it alone, but say the cache may be shared
        logger.warning("memserve: additional_config is not a dict; vLLM's compile cache may not tell the "
                       "memory-wrapped model from the plain one (clear it when switching)")


def __getattr__(name: str):
    # Lazy: vLLM's registry imports "memserve.serving.model:Memserve<Base>" only in processes that
    # build the model, so the plugin itself stays cheap to import.
    base = base_architecture(name)
    if base is None:
        raise AttributeError(name)
    from vllm import ModelRegistry

    cls = with_memory(ModelRegistry.models[base].load_model_cls())
    cls.__name__ = cls.__qualname__ = name
    globals()[name] = cls
    return cls
