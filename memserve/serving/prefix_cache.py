"""Prefix caching with edits: KV blocks before a request's routing span are shared, the rest is private.

The memory only changes a request's output from its last prompt token on, so the KV of every prompt
position is the base model's; but the route is decided from the statistics of the routing span (the
last user message of a chat prompt, `memserve.chat`), which the runtime can only read from positions
it computes, and the KV from the last prompt token on depends on the route. vLLM hashes full KV blocks
in a chain (each hash covers the whole prefix up to its block): `salt_block_hashes` adds the key
("memserve", request id) to every block that ends after the request's salt position (the span start;
0 for a memory that acts on every token). A cache hit therefore always stops at a block boundary at or
before the span start: a long system prompt is computed once and shared, while every routing-span
position is computed for each request and no request ever reads KV that another request's route
produced. Requests are salted by their own id (unique in the engine), so a preempted request can
still reuse its own blocks when it resumes.

`install()` patches vLLM once per process (`kv_cache_utils.generate_block_hash_extra_keys`, looked up
at call time by the request block hasher, and `EngineCore.preprocess_add_request`, through which
every request enters the engine); each engine decides on its first request whether it serves a memserve
store and only then salts its requests: a plain engine in the same process is untouched.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .options import RequestOptions

logger = logging.getLogger("vllm.memserve")

SALT_KEY = "memserve"
SALT_FROM_ATTR = "_memserve_salt_from"  # set on vLLM `Request` objects: first position to keep private
_ENGINE_ATTR = "_memserve_prefix_salt"  # set on `EngineCore`: its `PrefixSalt`, or None
_installed = False


class PrefixSalt:
    """Where a request's private KV begins: its routing span's start, or 0 when the memory acts on
    every token. `chat` is None for a tokenizer without a chat template (the whole prompt routes)."""

    def __init__(self, chat, acts_on_all: bool):
        self.chat = chat
        self.acts_on_all = acts_on_all

    def salt_from(self, prompt: list[int] | None, extra_args: Any) -> int:
        if self.acts_on_all or self.chat is None or not prompt:
            return 0
        options = RequestOptions.parse(extra_args, slots=None)
        return self.chat.routing_span(list(prompt[: options.routing_prompt_len(len(prompt))]))[0]

    def wrap(self, hasher: Callable) -> Callable:
        """The engine's request block hasher, marking each request's salt position before hashing."""

        def salted_hasher(request):
            if not hasattr(request, SALT_FROM_ATTR):
                try:
                    params = request.sampling_params
                    salt = self.salt_from(request.prompt_token_ids, params.extra_args if params is not None else None)
                except Exception:  # noqa: BLE001 - never fail a request for caching: keep all of it private
                    logger.exception("memserve: could not find the routing span of %s; its KV is not shared",
                                     request.request_id)
                    salt = 0
                setattr(request, SALT_FROM_ATTR, salt)
            return hasher(request)

        return salted_hasher


def salt_block_hashes(generate_extra_keys: Callable) -> Callable:
    """`kv_cache_utils.generate_block_hash_extra_keys` plus the request's salt on private blocks."""

    def generate_block_hash_extra_keys(request, start_token_idx: int, end_token_idx: int, start_mm_idx: int):
        keys, mm_idx = generate_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx)
        salt_from = getattr(request, SALT_FROM_ATTR, None)
        if salt_from is None or end_token_idx <= salt_from:
            return keys, mm_idx
        return (keys or ()) + ((SALT_KEY, request.request_id),), mm_idx

    generate_block_hash_extra_keys.memserve_salted = True
    return generate_block_hash_extra_keys


def engine_salt(vllm_config) -> PrefixSalt | None:
    """The salt of an engine serving a memserve store (None for any other engine)."""
    from .model import acts_on_all, open_store_manifest, store_path_from
    from .plugin import is_memserve_engine

    hf_config = vllm_config.model_config.hf_config
    if not is_memserve_engine(hf_config):
        return None
    store, manifest = open_store_manifest(store_path_from(hf_config))
    if store is None:
        return None  # the model serves the base model unchanged: nothing routes
    store.close()
    on_all = acts_on_all(manifest)
    return PrefixSalt(None if on_all else chat_format(vllm_config.model_config.tokenizer), on_all)


def chat_format(tokenizer_name: str):
    from transformers import AutoTokenizer

    from memserve.chat import ChatFormat

    return ChatFormat(AutoTokenizer.from_pretrained(tokenizer_name))


def install() -> None:
    """Patch vLLM's block hashing and request intake (idempotent; see the module doc)."""
    global _installed
    if _installed:
        return
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.engine.core import EngineCore

    if not getattr(kv_cache_utils.generate_block_hash_extra_keys, "memserve_salted", False):
        kv_cache_utils.generate_block_hash_extra_keys = salt_block_hashes(kv_cache_utils.generate_block_hash_extra_keys)
    original = EngineCore.preprocess_add_request

    def preprocess_add_request(self, request):
        if not hasattr(self, _ENGINE_ATTR):  # the engine's first request: decide once
            salt = engine_salt(self.vllm_config) if self.request_block_hasher is not None else None
            if salt is not None:
                self.request_block_hasher = salt.wrap(self.request_block_hasher)
                logger.info("memserve: prefix caching on; KV is shared up to each request's routing span%s",
                            " (none: the memory acts on every token)" if salt.acts_on_all else "")
            setattr(self, _ENGINE_ATTR, salt)
        return original(self, request)

    EngineCore.preprocess_add_request = preprocess_add_request
    _installed = True
