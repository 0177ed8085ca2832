"""Hooks on vLLM's V1 model runner: what the memory needs to know about each batch.

`install_runner_hooks()` wraps `GPUModelRunner._model_forward` to hand the current batch
(`batch_plan`: request ids, prompt lengths, token offsets, positions) to the model's `MemoryRuntime`
for the duration of the forward, and `_on_request_state_removed` (the runner's hook for
request-scoped side caches) to free a request's routing state.
"""

from __future__ import annotations

import numpy as np
import torch

from .layers import running
from .options import RequestOptions
from .runtime import BatchPlan, MemoryRuntime

_installed = False
_pipeline_fixed = False


def runtime_of(model) -> MemoryRuntime | None:
    """The memory runtime attached to a vLLM model (None: no store, or not on this rank)."""
    return getattr(model, "memserve_runtime", None)


def batch_plan(runner, positions: torch.Tensor) -> BatchPlan:
    """The runner's current batch as a `BatchPlan`; requests seen for the first time also get their
    parsed options (invalid ones are refused there, never raised), prompt length, routing span, that
    span's token ids and where its last sentence starts."""
    batch = runner.input_batch
    n = batch.num_reqs
    req_ids = list(batch.req_ids[:n])
    starts = np.array(runner.query_start_loc.np[: n + 1], dtype=np.int64)
    first_pos = positions[torch.from_numpy(starts[:-1])].cpu().numpy() if n else np.zeros(0, np.int64)
    prompt_lens = np.zeros(n, dtype=np.int64)
    spans = np.zeros((n, 2), dtype=np.int64)
    options: list[RequestOptions | None] = [None] * n
    tokens: list[list[int] | None] = [None] * n
    sentences = np.zeros(n, dtype=np.int64)
    runtime = runtime_of(runner.model)
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
            sentences[i] = spans[i][0] + runtime.last_sentence_start(tokens[i])
    return BatchPlan(req_ids, starts, first_pos, prompt_lens, options, spans, tokens, sentences)


def install_runner_hooks() -> None:
    """Wrap the V1 runner's `_model_forward` and `_on_request_state_removed` (idempotent)."""
    global _installed
    if _installed:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original_forward = GPUModelRunner._model_forward
    original_removed = GPUModelRunner._on_request_state_removed

    def _model_forward(self, *args, **kwargs):
        runtime = runtime_of(getattr(self, "model", None))
        if runtime is None:
            return original_forward(self, *args, **kwargs)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        self.model.memserve_watcher.poll()  # between steps: a new store version serves new requests
        runtime.prune(self.requests)
        runtime.begin_step(batch_plan(self, positions))
        try:
            with running(runtime):
                return original_forward(self, *args, **kwargs)
        finally:
            runtime.end_step()

    def _on_request_state_removed(self, req_id, req_state):
        runtime = runtime_of(getattr(self, "model", None))
        if runtime is not None:
            runtime.free(req_id)
        return original_removed(self, req_id, req_state)

    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner._on_request_state_removed = _on_request_state_removed
    _installed = True


def install_pipeline_fix() -> None:
    """Work around vLLM 0.32's CPU runner under pipeline parallelism (idempotent): a stage after the
    first needs its `intermediate_tensors` buffer, which only the warm-up dummy run allocates, and
    the CPU worker skips the warm-up in eager mode with a fixed KV cache size (memserve's defaults), so
    the first real step failed (`assert self.intermediate_tensors is not None`). Allocate it as the
    dummy run would, on first use."""
    global _pipeline_fixed
    if _pipeline_fixed:
        return
    from vllm.distributed.parallel_state import get_pp_group
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.sync_and_gather_intermediate_tensors

    def sync_and_gather_intermediate_tensors(self, *args, **kwargs):
        if self.intermediate_tensors is None and not get_pp_group().is_first_rank:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)
        return original(self, *args, **kwargs)

    GPUModelRunner.sync_and_gather_intermediate_tensors = sync_and_gather_intermediate_tensors
    _pipeline_fixed = True
