"""The transformers reference path: a memory attached to one down-projection of an HF Llama model.

`EditedModel` is what the trainer, `memserve eval --backend hf` and the parity tests use. Routing is
decided once per sequence from its prompt tokens (first forward call) and kept for every later decode
step; the memory acts on the answer span only (see `methods.base`).
"""

from __future__ import annotations

import contextlib
from typing import Any
from dataclasses import dataclass

import torch
from torch import nn

from .chat import ChatFormat
from .methods import NO_ROUTE, EditMemory, mean_prompt_stats, route_explanation
from .models import down_proj


@dataclass
class RouteState:
    """Per-batch routing of the reference path; `routes` is filled by the first (prefill) call."""

    prompt_mask: torch.Tensor  # [B, T] bool
    answer_mask: torch.Tensor  # [B, T] bool
    routes: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    mean_stats: torch.Tensor | None = None  # [B, D], each row's prompt mean statistic
    contexts: torch.Tensor | None = None  # [B, D], each row's `context` (`EditMemory.reading`)
    mentions: list | None = None  # each row's `EditMemory.mentioned` (from its routing span's tokens)
    # Each row's last sentence of its routing span (`ChatFormat.last_sentence_start`) and the edits it
    # names, when the memory `routes_on_last_sentence`; and its mean statistic, from the first call.
    sentence_mask: torch.Tensor | None = None  # [B, T] bool
    sentence_mentions: list | None = None
    sentence_stats: torch.Tensor | None = None  # [B, D]

    def last_sentence(self, row: int | None = None):
        """`EditMemory.route`'s `last_sentence` argument, for all rows or one."""
        if self.sentence_stats is None:
            return None
        if row is None:
            return self.sentence_stats, self.sentence_mentions
        return self.sentence_stats[row], self.sentence_mentions[row]


class MemoryDownProj(nn.Module):
    """Base down_proj plus the memory's delta on routed answer-span tokens."""

    def __init__(self, base: nn.Module, memory: EditMemory):
        super().__init__()
        self.base = base
        self.memory = memory
        self.state: RouteState | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        out = self.base(a)
        state = self.state
        if state is None:
            return out
        batch, length, width = a.shape
        if state.routes is None:
            state.mean_stats = mean_prompt_stats(self.memory, a, state.prompt_mask)
            if state.sentence_mask is not None:
                state.sentence_stats = mean_prompt_stats(self.memory, a, state.sentence_mask)
            state.routes, state.scores = self.memory.route(state.mean_stats, state.mentions, state.last_sentence())
            apply = state.answer_mask
            a = self._read(state, a)
        else:  # a decode step: every new token belongs to the answer span
            apply = torch.ones(batch, length, dtype=torch.bool)
        token_routes = torch.where(apply, state.routes[:, None], NO_ROUTE).reshape(-1)
        context = state.contexts[:, None].expand(batch, length, -1).reshape(batch * length, -1)
        return out + self.memory.delta(a.reshape(-1, width), token_routes, context).reshape(batch, length, -1)

    def _read(self, state: RouteState, a: torch.Tensor) -> torch.Tensor:
        """Each routed row's `EditMemory.reading`: sets its context and returns `a` with its last prompt
        token's input replaced when the memory reads another one there."""
        state.contexts = state.mean_stats.clone()
        read = a.clone() if self.memory.reads_stored_inputs else a
        for row, route in enumerate(state.routes.tolist()):
            if route < 0:
                continue
            answers = bool(state.answer_mask[row].any())  # False: only the routing is asked (`explain`)
            last = int(state.answer_mask[row].float().argmax())  # the last prompt token
            chat_turn = answers and not bool(state.prompt_mask[row, last])
            context, last_input = self.memory.reading(route, state.mean_stats[row], chat_turn=chat_turn)
            state.contexts[row] = self.memory.neutral_context() if context is None else context
            if last_input is not None and answers:
                read[row, last] = last_input.to(a.dtype)
        return read


class EditedModel:
    """An HF causal LM with a memory at `layer`."""

    def __init__(self, model, tokenizer, memory: EditMemory, layer: int):
        self.model, self.tokenizer, self.memory, self.layer = model, tokenizer, memory, layer
        self.chat = ChatFormat(tokenizer)
        self.base_inputs: dict[tuple[int, ...], torch.Tensor] = {}  # see `training.out_of_scope_inputs`
        self.prefix_states: dict[tuple[int, ...], Any] = {}  # see `training.prefix_states`
        self.low_precision: dict[torch.dtype, Any] = {}  # see `training.low_precision_copy`
        base = down_proj(model, layer)
        self.proj = base if isinstance(base, MemoryDownProj) else MemoryDownProj(base, memory)
        self.proj.memory = memory
        model.model.layers[layer].mlp.down_proj = self.proj

    @contextlib.contextmanager
    def routing(self, ids: torch.Tensor, prompt_mask: torch.Tensor, answer_mask: torch.Tensor):
        spans = [row[mask].tolist() for row, mask in zip(ids, prompt_mask)]
        names = self.chat.continues_name
        state = RouteState(prompt_mask, answer_mask, mentions=[self.memory.mentioned(span, names) for span in spans])
        if self.memory.routes_on_last_sentence:
            state.sentence_mask = prompt_mask.clone()
            for row, span in enumerate(spans):
                offset = self.chat.last_sentence_start(span)
                state.sentence_mask[row, prompt_mask[row].nonzero().squeeze(1)[:offset]] = False
            state.sentence_mentions = [self.memory.mentioned(row[mask].tolist(), names)
                                       for row, mask in zip(ids, state.sentence_mask)]
        self.proj.state = state
        try:
            yield self.proj.state
        finally:
            self.proj.state = None

    # --- batching helpers ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def pad(self, sequences: list[list[int]], prompt_lens: list[int], left: bool = False):
        """Pad token lists into (ids, attention, prompt_mask, answer_mask); prompt_mask marks each
        row's routing span (`ChatFormat.routing_span` of its prompt)."""
        length = max(len(s) for s in sequences)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
        attention = torch.zeros(len(sequences), length, dtype=torch.bool)
        prompt_mask = torch.zeros_like(attention)
        answer_mask = torch.zeros_like(attention)
        act_on_all = self.memory.config.act_on == "all"
        for row, (seq, plen) in enumerate(zip(sequences, prompt_lens)):
            start = length - len(seq) if left else 0
            ids[row, start : start + len(seq)] = torch.tensor(seq)
            attention[row, start : start + len(seq)] = True
            span_start, span_end = self.chat.routing_span(seq[:plen])
            prompt_mask[row, start + span_start : start + span_end] = True
            answer_mask[row, start if act_on_all else start + plen - 1 : start + len(seq)] = True
        return ids, attention, prompt_mask, answer_mask

    @torch.no_grad()
    def logits(self, sequences: list[list[int]], prompt_lens: list[int], use_memory: bool = True):
        """Teacher-forced logits for right-padded sequences, routed from each row's prompt."""
        ids, attention, prompt_mask, answer_mask = self.pad(sequences, prompt_lens)
        if not use_memory:
            return self.model(input_ids=ids, attention_mask=attention.long()).logits, None
        with self.routing(ids, prompt_mask, answer_mask) as state:
            out = self.model(input_ids=ids, attention_mask=attention.long()).logits
        return out, state.routes

    @torch.no_grad()
    def explain(self, prompt_ids: list[int], top: int = 5) -> dict:
        """How one prompt is routed (`methods.route_explanation`), without generating."""
        ids, attention, prompt_mask, answer_mask = self.pad([prompt_ids], [len(prompt_ids)])
        with self.routing(ids, prompt_mask, torch.zeros_like(answer_mask)) as state:
            self.model(input_ids=ids, attention_mask=attention.long())
        return route_explanation(self.memory, state.mean_stats[0], top, state.mentions[0], state.last_sentence(0))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, use_memory: bool = True, min_new_tokens: int = 0):
        """Greedy continuations (token lists, stopped at EOS) and the route of each prompt. EOS cannot
        be chosen before `min_new_tokens` (vLLM's `min_tokens`)."""
        ids, attention, prompt_mask, answer_mask = self.pad(prompts, [len(p) for p in prompts], left=True)
        kwargs = dict(
            input_ids=ids, attention_mask=attention.long(), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            min_new_tokens=min_new_tokens,
        )
        routes = None
        if use_memory:
            with self.routing(ids, prompt_mask, answer_mask) as state:
                out = self.model.generate(**kwargs)
            routes = state.routes
        else:
            out = self.model.generate(**kwargs)
        results = []
        for row in out[:, ids.shape[1] :].tolist():
            if self.tokenizer.eos_token_id in row:
                row = row[: row.index(self.tokenizer.eos_token_id)]
            results.append(row)
        return results, routes
