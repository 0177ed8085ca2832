"""Offline inference through `vllm.LLM` with the memserve plugin: the backend of `eval --backend vllm`.

    from memserve.serving.offline import VllmEditedModel
    model = VllmEditedModel("./memstore")                 # fp32, eager: the reference-faithful mode
    tokens, routes = model.generate([[...prompt ids...]], max_new_tokens=16)
    argmax, routes = model.teacher_forced([[...prompt + target ids...]], prompt_lens=[n])

Routes are per request: -1 = no edit applied, otherwise the memory slot (see `route_labels`).
Set `VLLM_ENABLE_V1_MULTIPROCESSING=0` for a fast in-process engine (tests do).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .plugin import ServingTarget, register
from .options import PROMPT_LEN_ARG, ROUTE_ARG

DEFAULT_KVCACHE_GIB = "1"


def engine_kwargs(
    store: str | os.PathLike | None,
    model: str | os.PathLike | None = None,
    dtype: str = "float32",
    enforce_eager: bool | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """`vllm.LLM(**kwargs)` for serving `store` (prefix caching on: `prefix_cache.py`)."""
    target = ServingTarget.resolve(store, model)
    if enforce_eager is None:
        # fp32 eager matches the transformers reference; bf16 eager is wrong on this CPU backend (see
        # docs/VLLM_CPU_NOTES.md) so bf16 goes compiled.
        enforce_eager = dtype in ("float32", "fp32", "float")
    kwargs: dict[str, Any] = dict(
        model=str(target.model_dir),
        hf_overrides=target.hf_overrides(),
        dtype=dtype,
        enforce_eager=enforce_eager,
        enable_prefix_caching=True,
    )
    if target.acts_on_all:
        kwargs["enable_chunked_prefill"] = False  # the route must be known before any prompt token runs
    kwargs.update(overrides)
    return kwargs


@dataclass
class ScoredRow:
    """Teacher-forced probe of one sequence (same fields as `memserve.evaluate.Scored`)."""

    predicted: list[int]  # argmax at positions plen-1 .. len-2 (they predict tokens plen .. len-1)
    logprobs: list[float]  # log-probability of each actual answer token
    route: int


class VllmEditedModel:
    """A `vllm.LLM` serving a store; greedy generation and teacher-forced argmax with routes."""

    def __init__(self, store: str | os.PathLike | None, model: str | os.PathLike | None = None, **kwargs: Any):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KVCACHE_GIB)
        # In-process engine: the route lookups below pass functions to the model (apply_model), which
        # a separate engine process would only accept through pickle; it also starts faster.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        register()
        from vllm import LLM

        self.store = store
        self.kwargs = engine_kwargs(store, model, **kwargs)
        self.llm = LLM(**self.kwargs)
        self.last_request_ids: list[str] = []
        self.last_cached_tokens: list[int] = []  # prompt tokens each request of the last `generate` read from the prefix cache

    # --- routes ---------------------------------------------------------------------------------
    def routes(self, request_ids: list[str]) -> list[int | None]:
        """Route taken by each (finished) request: -1 when no edit applied or no memory is attached,
        None when unknown (never reported as "no edit")."""

        def lookup(model, ids=tuple(request_ids)):
            runtime = getattr(model, "memserve_runtime", None)
            if runtime is None:
                return [-1] * len(ids)
            out = []
            for rid in ids:
                info = runtime.route_info(rid)
                out.append(None if info is None else info.route)
            return out

        return self.llm.apply_model(lookup)[0]

    def route_labels(self, routes: list[int]) -> list[str]:
        def labels(model, values=tuple(routes)):
            runtime = getattr(model, "memserve_runtime", None)
            if runtime is None:
                return ["none"] * len(values)
            return [runtime.memory.route_label(r) for r in values]

        return self.llm.apply_model(labels)[0]

    # --- inference ------------------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, use_memory: bool = True, ignore_eos: bool = False,
    ) -> tuple[list[list[int]], list[int]]:
        """Greedy continuations (stopped at EOS, which is not included) and the route of each prompt
        (`use_memory=False`: the base model). `ignore_eos`: exactly `max_new_tokens` each, EOS included
        (every request lives equally long, so two runs of one prompt list see the same batch shapes)."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=ignore_eos,
                                extra_args=None if use_memory else {ROUTE_ARG: -1})
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        if not ignore_eos:
            eos = self.llm.get_tokenizer().eos_token_id
            tokens = [t[: t.index(eos)] if eos in t else t for t in tokens]
        self.last_request_ids = [o.request_id for o in outputs]
        self.last_cached_tokens = [o.num_cached_tokens or 0 for o in outputs]
        return tokens, self.routes(self.last_request_ids)

    def route_scores(self, request_ids: list[str] | None = None) -> list[float | None]:
        """Routing score of each (finished) request, by default those of the last `generate` (MEMOIR:
        the best key overlap; NaN when forced; None: never routed)."""

        def lookup(model, ids=tuple(self.last_request_ids if request_ids is None else request_ids)):
            runtime = getattr(model, "memserve_runtime", None)
            infos = [None if runtime is None else runtime.route_info(rid) for rid in ids]
            return [None if info is None else info.score for info in infos]

        return self.llm.apply_model(lookup)[0]

    def _prompt_logprobs(self, sequences, prompt_lens, use_memory: bool):
        from vllm import SamplingParams

        prompts, params = [], []
        for seq, plen in zip(sequences, prompt_lens):
            if not 0 < plen <= len(seq):
                raise ValueError(f"prompt length {plen} outside 1..{len(seq)}")
            extra = {PROMPT_LEN_ARG: int(plen)}
            if not use_memory:
                extra[ROUTE_ARG] = -1
            prompts.append({"prompt_token_ids": list(seq)})
            params.append(SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, extra_args=extra))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return outputs, self.routes([o.request_id for o in outputs])

    def teacher_forced(
        self, sequences: list[list[int]], prompt_lens: list[int], use_memory: bool = True,
    ) -> tuple[list[list[int]], list[int]]:
        """Argmax next token at every position but the last (`len(seq) - 1` per row), routed from each
        row's first `prompt_lens[i]` tokens, the memory acting from the last prompt token on
        (`use_memory=False`: the base model, route -1)."""
        outputs, routes = self._prompt_logprobs(sequences, prompt_lens, use_memory)
        argmax = []
        for o in outputs:
            # entry j predicts token j from tokens < j; it holds the actual token and the rank-1 token
            argmax.append([next(tok for tok, lp in entry.items() if lp.rank == 1) for entry in o.prompt_logprobs[1:]])
        return argmax, routes

    def score(self, sequences: list[list[int]], prompt_lens: list[int], use_memory: bool = True) -> list[ScoredRow]:
        """Answer-span probes as `memserve.evaluate.Backend.score` wants them."""
        outputs, routes = self._prompt_logprobs(sequences, prompt_lens, use_memory)
        rows = []
        for o, seq, plen, route in zip(outputs, sequences, prompt_lens, routes):
            entries = o.prompt_logprobs  # entries[j]: distribution of token j
            predicted = [next(tok for tok, lp in entries[j].items() if lp.rank == 1) for j in range(plen, len(seq))]
            logprobs = [float(entries[j][seq[j]].logprob) for j in range(plen, len(seq))]
            rows.append(ScoredRow(predicted, logprobs, route))
        return rows
