"""Learning one edit at a time, fast.

Only the memory at layer L trains, and it acts only from the last prompt token on. So the model runs
once per edit up to layer L (`capture`), and each optimisation step recomputes just layers L+1.. on
top of the cached residual stream, with logits only at the target positions (`FastStepper`).
`NaiveStepper` runs the full model every step, as the reference code does; it exists to measure the
speed-up side by side and to check both agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .facts import Fact
from .hf import EditedModel
from .methods import EditExamples, EditSession

PREFIX_SEEDS = ("I", "You", "Because", "Yes", "Q: ")
PREFIX_LENGTHS = (5, 10)


def generate_prefixes(edited: EditedModel) -> list[str]:
    """Short greedy continuations of a few seed words, prepended to edit prompts for robustness."""
    seeds = [edited.encode(seed) for seed in PREFIX_SEEDS]
    prefixes = []
    for length in PREFIX_LENGTHS:
        outs, _ = edited.generate(seeds, length, use_memory=False)
        for seed, out in zip(seeds, outs):
            text = edited.tokenizer.decode(seed + out, skip_special_tokens=True)
            prefixes.append(" ".join(text.split()))
    return prefixes


@dataclass
class TokenBatch:
    sequences: list[list[int]]
    prompt_lens: list[int]
    in_scope: list[bool]


def prompt_and_answer(edited: EditedModel, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of `prompt + " " + answer` (tokenised in two parts) and the prompt's length."""
    prompt_ids = edited.encode(prompt.rstrip())
    answer_ids = edited.encode(" " + answer.strip()) if answer.strip() else []
    return prompt_ids + answer_ids, len(prompt_ids)


def edit_batch(edited: EditedModel, fact: Fact, prefixes: list[str], out_of_scope: tuple[str, str]) -> TokenBatch:
    """Row 0: the bare edit; then one row per prefix; last: one out-of-scope example."""
    prompts = [fact.prompt] + [f"{prefix}. {fact.prompt}" for prefix in prefixes]
    rows = [prompt_and_answer(edited, p, fact.target) for p in prompts]
    rows.append(prompt_and_answer(edited, *out_of_scope))
    return TokenBatch([r[0] for r in rows], [r[1] for r in rows], [True] * len(prompts) + [False])


class _Stop(Exception):
    pass


def capture(edited: EditedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the base model up to the edited layer: (down_proj input a, residual stream after layer L)."""
    grabbed: dict[str, torch.Tensor] = {}

    def grab_input(_module, args):
        grabbed["a"] = args[0]

    def grab_output_and_stop(_module, _args, output):
        grabbed["hidden"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    layer = edited.model.model.layers[edited.layer]
    handles = [edited.proj.register_forward_pre_hook(grab_input), layer.register_forward_hook(grab_output_and_stop)]
    try:
        with torch.no_grad():
            edited.model.model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return grabbed["a"], grabbed["hidden"]


@dataclass
class Prepared:
    """A batch with its targets located and the memory's inputs cached."""

    ids: torch.Tensor
    examples: EditExamples
    hidden: torch.Tensor  # residual stream after layer L, memory off
    apply_rows: torch.Tensor  # in-scope answer-span positions, where the memory acts
    apply_cols: torch.Tensor
    target_rows: torch.Tensor  # positions whose logits predict a target token
    target_cols: torch.Tensor
    target_ids: torch.Tensor


def prepare(edited: EditedModel, batch: TokenBatch) -> Prepared:
    ids, _, prompt_mask, answer_mask = edited.pad(batch.sequences, batch.prompt_lens)
    in_scope = torch.tensor(batch.in_scope)
    a, hidden = capture(edited, ids)
    apply_rows, apply_cols = (answer_mask & in_scope[:, None]).nonzero(as_tuple=True)
    rows, cols, targets = [], [], []
    for row, (seq, plen) in enumerate(zip(batch.sequences, batch.prompt_lens)):
        if batch.in_scope[row]:
            for pos in range(plen, len(seq)):
                rows.append(row)
                cols.append(pos - 1)
                targets.append(seq[pos])
    examples = EditExamples(a=a, prompt_mask=prompt_mask, answer_mask=answer_mask, in_scope=in_scope)
    return Prepared(ids, examples, hidden, apply_rows, apply_cols, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets))


class FastStepper:
    """Target logits from the cached residual stream: recompute layers L+1.. only."""

    def __init__(self, edited: EditedModel, prepared: Prepared):
        self.edited, self.p = edited, prepared
        self.a_apply = prepared.examples.a[prepared.apply_rows, prepared.apply_cols]
        base = edited.model.model
        length = prepared.hidden.shape[1]
        self.positions = torch.arange(length)[None].expand(prepared.hidden.shape[0], length)
        self.rotary = base.rotary_emb(prepared.hidden, self.positions)

    def target_logits(self, session: EditSession) -> torch.Tensor:
        p, base = self.p, self.edited.model.model
        delta = session.delta(self.a_apply).to(p.hidden.dtype)
        hidden = p.hidden.index_put((p.apply_rows, p.apply_cols), delta, accumulate=True)
        for layer in base.layers[self.edited.layer + 1 :]:
            hidden = layer(hidden, attention_mask=None, position_ids=self.positions, position_embeddings=self.rotary)
        return self.edited.model.lm_head(base.norm(hidden[p.target_rows, p.target_cols]))


class NaiveStepper:
    """Reference-style step: the whole model forward with the memory hooked in, all logits."""

    def __init__(self, edited: EditedModel, prepared: Prepared):
        self.edited, self.p = edited, prepared

    def target_logits(self, session: EditSession) -> torch.Tensor:
        p = self.p

        def add_delta(_module, args, output):
            a = args[0]
            delta = session.delta(a[p.apply_rows, p.apply_cols]).to(output.dtype)
            return output.index_put((p.apply_rows, p.apply_cols), delta, accumulate=True)

        handle = self.edited.proj.register_forward_hook(add_delta)
        try:
            logits = self.edited.model(input_ids=p.ids, use_cache=False).logits
        finally:
            handle.remove()
        return logits[p.target_rows, p.target_cols]


@dataclass
class EditOutcome:
    loss: float
    steps: int
    seconds: float
    record: dict[str, Any] = field(default_factory=dict)


def train_edit(edited: EditedModel, batch: TokenBatch, naive: bool = False) -> EditOutcome:
    """Learn one edit into `edited.memory` (in place) and report how it went."""
    start = time.perf_counter()
    cfg = edited.memory.config
    prepared = prepare(edited, batch)
    stepper = (NaiveStepper if naive else FastStepper)(edited, prepared)
    session = edited.memory.start_edit(prepared.examples)
    params = session.parameters()
    optimizer = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_value, steps = float("nan"), 0
    for steps in range(1, cfg.steps + 1):
        logits = stepper.target_logits(session)
        loss = F.cross_entropy(logits.float(), prepared.target_ids)
        aux = session.aux_loss(prepared.examples)
        if aux is not None:
            loss = loss + aux
        loss_value = float(loss)
        if loss_value <= cfg.stop_loss:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        session.after_step()
    record = session.finish()
    return EditOutcome(loss=loss_value, steps=steps, seconds=time.perf_counter() - start, record=record)
