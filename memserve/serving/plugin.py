"""vLLM plugin: a Llama model whose edited down-projection calls a memserve memory.

`register()` (entry point `vllm.general_plugins`, runs in every vLLM process) registers the
architecture `MemserveLlamaForCausalLM`; select it with
`hf_overrides={"architectures": ["MemserveLlamaForCausalLM"], "memserve_store": "/path/to/store"}`
(the store may also come from the environment variable `MEMSERVE_STORE`).

After the base weights are loaded the model rebuilds the memory from the store with
`memserve.editor.load_memory` (the same memory object and routing code as the transformers reference
path) and wraps `model.layers[L].mlp.down_proj` (L from the store manifest). The wrapper adds the
memory's contribution through the custom op `memserve::memory_apply`, which is opaque to
torch.compile, so routing stays dynamic in compiled mode.

Per-request information (request ids, prompt lengths, token offsets, positions) comes from the V1
model runner: `install_runner_hooks()` wraps `GPUModelRunner._model_forward` to hand the current batch
to the model's `MemoryRuntime` for the duration of the forward, and `_on_request_state_removed` (the
runner's hook for request-scoped side caches) to free a request's routing state.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from .options import RequestOptions
from .runtime import BatchPlan, MemoryRuntime

logger = logging.getLogger("vllm.memserve")  # under "vllm": shown by vLLM's log handler

ARCH = "MemserveLlamaForCausalLM"
STORE_ENV = "MEMSERVE_STORE"
STORE_CONFIG_KEY = "memserve_store"

# The runtime of the model whose forward runs in this thread (set by the runner hook for the duration
# of the forward): what the custom op applies. Nothing process-specific (such as an object id) may be an
# argument of the op: dynamo bakes Python values into the traced graph as constants, and the graph is
# cached on disk (inductor FX cache, vLLM's AOT artifacts) and reused by later processes.
_current = threading.local()
# Part of vLLM's compile-cache hash (`additional_config`) when a memory is attached: the wrapped graph
# and the plain one must never be served from each other's cache entry (vLLM's hash ignores
# `hf_overrides`, which is where the store is named). Bump when the wrapper's graph changes.
GRAPH_REVISION = 1
COMPILE_CACHE_KEY = "memserve_memory"
_registered = False
_hooks_installed = False


class StoreWeightMismatch(RuntimeError):
    pass


# --- the custom op -------------------------------------------------------------------------------
@torch.library.custom_op("memserve::memory_apply", mutates_args=())
def memory_apply(out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    runtime = current_runtime()
    result = out if runtime is None else runtime.apply(out, a)  # None: a forward outside the runner hook
    return result.clone() if result is out else result


@memory_apply.register_fake
def _memory_apply_fake(out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(out)


def current_runtime() -> MemoryRuntime | None:
    return getattr(_current, "runtime", None)


class MemoryDownProjection(nn.Module):
    """vLLM down_proj (RowParallelLinear, returns (out, bias)) plus the memory on routed tokens."""

    requires_unquantized_input = True  # keep vLLM from fusing an activation quant into our input

    def __init__(self, base: nn.Module, runtime: MemoryRuntime):
        super().__init__()
        self.base = base
        self.runtime = runtime  # not an nn.Module: holds no parameters vLLM would try to load

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x):
        out, bias = self.base(x)
        if torch.compiler.is_compiling():
            out = torch.ops.memserve.memory_apply(out, x)  # the runtime is looked up at run time
        else:
            out = self.runtime.apply(out, x)
        return out, bias


# --- store loading ---------------------------------------------------------------------------------
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


def down_proj_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.down_proj.weight"


def _memserve_model_class():
    from vllm.model_executor.models.llama import LlamaForCausalLM

    class MemserveLlamaForCausalLM(LlamaForCausalLM):
        """LlamaForCausalLM with a memserve memory on one down-projection (see module doc)."""

        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            self.memserve_runtime: MemoryRuntime | None = None
            self.memserve_watcher = None  # reload.StoreWatcher, set with the runtime
            self._memserve_store = store_path_from(vllm_config.model_config.hf_config)
            self._memserve_tokenizer = vllm_config.model_config.tokenizer
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
                self._attach(store, manifest, layer, captured.get("w"))
            finally:
                store.close()
            return loaded

        def _attach(self, store, manifest, layer: int, checkpoint_weight: torch.Tensor | None) -> None:
            from memserve.editor import load_memory
            from memserve.models import weight_hash

            from vllm.distributed import get_tensor_model_parallel_world_size

            if get_tensor_model_parallel_world_size() > 1:
                raise RuntimeError("memserve: tensor parallelism is not supported (the memory needs the full "
                                   "down_proj input); serve with --tensor-parallel-size 1")
            mlp = self.model.layers[layer].mlp
            if checkpoint_weight is None:  # e.g. a loader that renamed the tensor: use what was loaded
                checkpoint_weight = mlp.down_proj.weight.detach().to(torch.float32).clone()
            digest = weight_hash(checkpoint_weight)
            if digest != manifest["weight_hash"]:
                raise StoreWeightMismatch(
                    f"memserve: store {store.path} was built for model {manifest['model']} (layer {layer} "
                    f"weights {manifest['weight_hash'][:12]}), but the loaded weights hash to {digest[:12]}; "
                    "serve it with the model it was edited on"
                )
            memory = load_memory(store, checkpoint_weight)
            memory.eval()
            from .prefix_cache import chat_format
            from .reload import StoreWatcher

            runtime = MemoryRuntime(memory, chat_format(self._memserve_tokenizer), version=store.version)
            self.memserve_watcher = StoreWatcher(store.path, checkpoint_weight, digest, layer, runtime,
                                                 identity=store.identity())
            mlp.down_proj = MemoryDownProjection(mlp.down_proj, runtime)
            self.memserve_runtime = runtime
            mark_compile_cache(self._memserve_vllm_config, layer)
            install_runner_hooks()
            logger.info(
                "memserve: %s memory with %d edits on layer %d from %s", manifest["method"], memory.num_edits,
                layer, store.path,
            )

    MemserveLlamaForCausalLM.__name__ = MemserveLlamaForCausalLM.__qualname__ = ARCH
    return MemserveLlamaForCausalLM


def __getattr__(name: str):
    # Lazy: vLLM's registry imports "memserve.serving.plugin:MemserveLlamaForCausalLM" only in
    # processes that build the model, so the plugin itself stays cheap to import.
    if name == ARCH:
        cls = _memserve_model_class()
        globals()[ARCH] = cls
        return cls
    raise AttributeError(name)


# --- runner hooks ------------------------------------------------------------------------------------
def _runtime_of(runner) -> MemoryRuntime | None:
    return getattr(getattr(runner, "model", None), "memserve_runtime", None)


def batch_plan(runner, positions: torch.Tensor) -> BatchPlan:
    """The runner's current batch as a `BatchPlan`; requests seen for the first time also get their
    parsed options (invalid ones are refused there, never raised), prompt length, routing span and
    that span's token ids."""
    batch = runner.input_batch
    n = batch.num_reqs
    req_ids = list(batch.req_ids[:n])
    starts = np.array(runner.query_start_loc.np[: n + 1], dtype=np.int64)
    first_pos = positions[torch.from_numpy(starts[:-1])].cpu().numpy() if n else np.zeros(0, np.int64)
    prompt_lens = np.zeros(n, dtype=np.int64)
    spans = np.zeros((n, 2), dtype=np.int64)
    options: list[RequestOptions | None] = [None] * n
    tokens: list[list[int] | None] = [None] * n
    runtime = _runtime_of(runner)
    for i, rid in enumerate(req_ids):
        if rid in runtime.states:  # options, length and span are only read when a request is first seen
            continue
        state = runner.requests[rid]
        params = state.sampling_params
        options[i] = RequestOptions.parse(params.extra_args if params is not None else None, runtime.memory_slots())
        prompt_lens[i] = options[i].routing_prompt_len(state.num_prompt_tokens)
        spans[i] = runtime.routing_span(state.prompt_token_ids, int(prompt_lens[i]))
        if state.prompt_token_ids is not None:
            tokens[i] = list(state.prompt_token_ids[spans[i][0] : spans[i][1]])
    return BatchPlan(req_ids, starts, first_pos, prompt_lens, options, spans, tokens)


def install_runner_hooks() -> None:
    """Wrap the V1 runner's `_model_forward` and `_on_request_state_removed` (idempotent)."""
    global _hooks_installed
    if _hooks_installed:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original_forward = GPUModelRunner._model_forward
    original_removed = GPUModelRunner._on_request_state_removed

    def _model_forward(self, *args, **kwargs):
        runtime = _runtime_of(self)
        if runtime is None:
            return original_forward(self, *args, **kwargs)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        self.model.memserve_watcher.poll()  # between steps: a new store version serves new requests
        runtime.prune(self.requests)
        runtime.begin_step(batch_plan(self, positions))
        outer = current_runtime()
        _current.runtime = runtime
        try:
            return original_forward(self, *args, **kwargs)
        finally:
            _current.runtime = outer
            runtime.end_step()

    def _on_request_state_removed(self, req_id, req_state):
        runtime = _runtime_of(self)
        if runtime is not None:
            runtime.free(req_id)
        return original_removed(self, req_id, req_state)

    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner._on_request_state_removed = _on_request_state_removed
    _hooks_installed = True


def mark_compile_cache(vllm_config, layer: int) -> None:
    """Make vLLM's compile-cache hash tell the wrapped model from the plain one (see GRAPH_REVISION).
    Called before the first forward, which is when vLLM hashes the config for its compile cache."""
    extra = vllm_config.additional_config
    if isinstance(extra, dict):
        extra[COMPILE_CACHE_KEY] = {"graph": GRAPH_REVISION, "layer": layer}
    else:  # a platform's own SupportsHash object: leave it alone, but say the cache may be shared
        logger.warning("memserve: additional_config is not a dict; vLLM's compile cache may not tell the "
                       "memory-wrapped model from the plain one (clear it when switching)")


def get_runtime(model) -> MemoryRuntime | None:
    return getattr(model, "memserve_runtime", None)


# --- plugin entry point ---------------------------------------------------------------------------------
def register() -> None:
    """vLLM general plugin: make the memserve architecture known and let engines serving a store
share KV up to each request's routing span (`prefix_cache`); idempotent."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from . import prefix_cache

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, f"{__name__}:{ARCH}")
    prefix_cache.install()
    _registered = True


def hf_overrides(store: str | os.PathLike | None) -> dict:
    """`hf_overrides` selecting the memserve model for `store` (None: base model through the same class)."""
    overrides: dict = {"architectures": [ARCH]}
    if store is not None:  # absolute, not resolved: hot reload follows a symlink that is repointed later
        overrides[STORE_CONFIG_KEY] = str(Path(store).absolute())
    return overrides


def hf_overrides_json(store) -> str:
    return json.dumps(hf_overrides(store))
