"""Learning one edit at a time, fast.

Only the memory at layer L trains, and it acts only from the last prompt token on. So the model runs
once per edit up to layer L (`capture`), and each optimisation step recomputes just layers L+1.. on
top of the cached residual stream, with logits only at the target positions (`FastStepper`) and only
for the tokens that can matter there (`CandidateHead`), with the products in bf16 where the CPU
multiplies it natively (`MethodConfig.step_dtype`; an edit still stops on its fp32 loss).
`NaiveStepper` runs the full model every step, as the reference code does; it exists to measure the
speed-up side by side and to check both agree.
"""

from __future__ import annotations

import time
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .facts import Fact
from .hf import EditedModel
from .methods import EditExamples, EditSession, mean_prompt_stats
from .subjects import AnchorIndex, anchor_tokens, infer_subject, is_short_name, name_continues, subject_suffices

PREFIX_SEEDS = ("I", "You", "Because", "Yes", "Q: ")
PREFIX_LENGTHS = (5,)  # (5, 10) on ZsRE dev: no better, and twice the rows to train on


def generate_prefixes(edited: EditedModel, count: int) -> list[str]:
    """Short greedy continuations of the first `count` seed words, prepended to edit prompts for robustness."""
    if not 0 <= count <= len(PREFIX_SEEDS):
        raise ValueError(f"training_prefixes must be in 0..{len(PREFIX_SEEDS)}, got {count}")
    seeds = [edited.encode(seed) for seed in PREFIX_SEEDS[:count]]
    if not seeds:
        return []
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
    key_rows: tuple[int, ...] = (0,)
    anchors: tuple[tuple[int, ...], ...] = ()
    anchor_suffices: bool = False
    anchor_open_name: bool = False  # the fact's prompt carries its subject on (`subjects.name_continues`)
    key_tokens: tuple[tuple[int, ...], ...] = ()  # each key row's routing-span tokens outside its subject
    # Per row, how many leading tokens every edit's batch repeats (the chat template before the
    # question, a training prefix): `capture_rows` computes their states once per model.
    recurring: tuple[int, ...] = ()


def prompt_and_answer(edited: EditedModel, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of `prompt + " " + answer` (tokenised in two parts) and the prompt's length."""
    prompt_ids = edited.encode(prompt.rstrip())
    answer_ids = edited.encode(" " + answer.strip()) if answer.strip() else []
    return prompt_ids + answer_ids, len(prompt_ids)


def chat_prompt_and_answer(edited: EditedModel, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of `prompt` as a chat user turn followed by `answer` as the reply, and the prompt's length."""
    prompt_ids = edited.chat.format(prompt.strip())
    return prompt_ids + edited.encode(answer.strip()), len(prompt_ids)


def edit_batch(
    edited: EditedModel, fact: Fact, prefixes: list[str], out_of_scope: tuple[str, str] | list[tuple[str, str]]
) -> TokenBatch:
    """Row 0: the bare edit; row 1: the edit as a chat turn (when the tokenizer has a chat template;
    its routing span gives the edit a second key); then one row per prefix; last: the out-of-scope
    example(s) (a (prompt, answer) pair or a list of them). With `stop_after_answer` the key rows'
    answers end in the end-of-sequence token. The batch's anchors are the subject's token ids (the
    fact's `subject`, else `infer_subject`), kept only if every key row's routing span names them."""
    negatives = [out_of_scope] if isinstance(out_of_scope, tuple) else list(out_of_scope)
    rows = [prompt_and_answer(edited, fact.prompt, fact.target)]
    if edited.chat.available:
        rows.append(chat_prompt_and_answer(edited, fact.prompt, fact.target))
    key_rows = tuple(range(len(rows)))
    anchors, suffices, open_name, key_tokens = edit_anchors(edited, fact, [seq[:plen] for seq, plen in rows])
    eos = edited.tokenizer.eos_token_id
    if edited.memory.config.stop_after_answer and eos is not None:
        rows = [(seq + [eos], plen) for seq, plen in rows]
    recurring = [edited.chat.routing_span(seq[:plen])[0] for seq, plen in rows]
    for prefix in prefixes:
        rows.append(prompt_and_answer(edited, f"{prefix}. {fact.prompt}", fact.target))
        opening = edited.encode(f"{prefix}.")
        recurring.append(len(opening) if rows[-1][0][: len(opening)] == opening else 0)
    in_scope = [True] * len(rows) + [False] * len(negatives)
    rows += [prompt_and_answer(edited, *negative) for negative in negatives]
    recurring += [0] * len(negatives)
    return TokenBatch([r[0] for r in rows], [r[1] for r in rows], in_scope, key_rows, anchors, suffices, open_name,
                      key_tokens, tuple(recurring))


def edit_anchors(edited: EditedModel, fact: Fact, key_prompts: list[list[int]]
                 ) -> tuple[tuple[tuple[int, ...], ...], bool, bool, tuple[tuple[int, ...], ...]]:
    """Token id variants of the fact's subject (its `subject`, and the name `infer_subject` finds
    when that is a shorter way to say it, `is_short_name`: temporal data gives "5G is" where questions
    say "5G"; without `subject`, the inferred name), or () when it has none or one of its own key
    prompts would not name it (it then routes on its key alone); whether naming the subject
    suffices (`subjects.subject_suffices`); whether the prompt carries it on (`subjects.name_continues`);
    and each key prompt's routing-span tokens outside the subject (`subjects.Mentions.rest`; all of
    them for an edit without anchors)."""
    spans = [tuple(prompt[slice(*edited.chat.routing_span(prompt))]) for prompt in key_prompts]
    inferred = infer_subject(fact.prompt)
    subjects = [s for s in (fact.subject, inferred) if s]
    if fact.subject and inferred and not is_short_name(fact.subject, inferred):
        subjects = [fact.subject]
    variants = list(dict.fromkeys(tuple(ids) for subject in subjects
                                  for ids in anchor_tokens(edited.tokenizer, subject, fact.prompt)))
    if not variants:
        return (), False, False, tuple(spans)
    suffices = any(subject_suffices(fact.prompt, subject) for subject in subjects)
    open_name = name_continues(fact.prompt, fact.subject)
    index = AnchorIndex()
    index.add(0, variants, suffices, open_name)
    names = edited.chat.continues_name if getattr(edited.memory.config, "whole_names", False) else None  # as served
    mentions = [index.mentioned(span, names) for span in spans]
    if any(0 not in named for named in mentions):
        return (), False, False, tuple(spans)
    return tuple(variants), suffices, open_name, tuple(named.rest for named in mentions)


class _Stop(Exception):
    pass


def capture(edited: EditedModel, ids: torch.Tensor, upper_inputs: bool = False):
    """Run the base model once: the down_proj input `a` at layer L, the residual stream after layer L
    and, with `upper_inputs`, the input of every layer above (otherwise the run stops at layer L)."""
    grabbed: dict[str, torch.Tensor] = {}
    uppers: list[torch.Tensor] = []

    def grab_input(_module, args):
        grabbed["a"] = args[0]

    def grab_output(_module, _args, output):
        grabbed["hidden"] = output[0] if isinstance(output, tuple) else output
        if not upper_inputs:
            raise _Stop

    layers = edited.model.model.layers
    handles = [edited.proj.register_forward_pre_hook(grab_input), layers[edited.layer].register_forward_hook(grab_output)]
    if upper_inputs:
        handles += [layer.register_forward_pre_hook(lambda _m, args: uppers.append(args[0])) for layer in layers[edited.layer + 1 :]]
    try:
        with torch.no_grad():
            edited.model.model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return grabbed["a"], grabbed["hidden"], uppers


@dataclass
class Prepared:
    """A batch with its targets located and the memory's inputs cached."""

    ids: torch.Tensor
    examples: EditExamples
    row_stats: torch.Tensor  # [S, D] each row's prompt mean statistic (the memory's `context`)
    hidden: torch.Tensor  # residual stream after layer L, memory off
    upper_inputs: list[torch.Tensor]  # input of each layer above L, memory off
    apply_rows: torch.Tensor  # in-scope answer-span positions, where the memory acts
    apply_cols: torch.Tensor
    target_rows: torch.Tensor  # positions whose logits predict a target token
    target_cols: torch.Tensor
    target_ids: torch.Tensor


def out_of_scope_inputs(edited: EditedModel, sequences: list[list[int]]) -> list[torch.Tensor]:
    """The down_proj input at layer L of each out-of-scope sequence ([len, I]). Only the routing
    loss reads these rows, and the same background prompts recur in every edit, so each is run once
    per model (`edited.base_inputs`): WISE's 24 negatives were three quarters of an edit's capture."""
    cache = edited.base_inputs
    missing = list(dict.fromkeys(tuple(seq) for seq in sequences if tuple(seq) not in cache))
    if missing:
        ids, _, _, _ = edited.pad([list(seq) for seq in missing], [len(seq) for seq in missing])
        a, _, _ = capture(edited, ids)
        for row, seq in enumerate(missing):
            cache[seq] = a[row, : len(seq)].clone()
    return [cache[tuple(seq)] for seq in sequences]


def length_groups(lengths: dict[int, int], slack: float = 2.0) -> list[list[int]]:
    """Rows grouped by length (shortest first) so that no row in a group is more than `slack` times
    the group's shortest: a chat-turn row carries the system prompt (45 tokens against ~20 for a
    ZsRE question), and padded into one batch it tripled every row's cost."""
    groups: list[list[int]] = []
    for row in sorted(lengths, key=lengths.get):
        if groups and lengths[row] <= slack * lengths[groups[-1][0]]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def capture_rows(edited: EditedModel, batch: TokenBatch, rows: list[int]):
    """`capture` with the upper inputs for `rows` of `batch` (run in `length_groups`), as [B, T, ...]
    tensors over all its rows, padded as `edited.pad` pads them, zero elsewhere. Llama-family models
    (`FastStepper.supports`) run only what follows each row's `recurring` tokens, on top of their
    states computed once per model (`prefix_states`): the chat template and the training prefixes
    were ~40% of an edit's capture."""
    sequences = batch.sequences
    width = max(len(seq) for seq in sequences)
    fast = FastStepper.supports(edited)
    skip = {row: batch.recurring[row] if fast and batch.recurring else 0 for row in rows}
    outs: list[torch.Tensor] = []  # a, hidden, then each upper input
    for group in length_groups({row: len(sequences[row]) - skip[row] for row in rows}):
        if fast:
            prefixes = [prefix_states(edited, sequences[row][: skip[row]]) for row in group]
            states = base_states(edited, [sequences[row][skip[row] :] for row in group], prefixes)
            # hidden after L, then the input of each layer above (the output of the one below it)
            layers = [edited.layer, *range(edited.layer, len(edited.model.model.layers) - 1)]

            def joined(pick):  # each row's prefix part (if any) then its own, of one captured tensor
                return [torch.cat([pick(p)[0], pick(states)[i]]) if p else pick(states)[i] for i, p in enumerate(prefixes)]

            parts = [joined(lambda s: s.a)] + [joined(lambda s, l=l: s.outputs[l]) for l in layers]
        else:
            ids, _, _, _ = edited.pad([sequences[row] for row in group], [batch.prompt_lens[row] for row in group])
            a, hidden, uppers = capture(edited, ids, upper_inputs=True)
            parts = [list(part) for part in (a, hidden, *uppers)]
        outs = outs or [part[0].new_zeros(len(sequences), width, part[0].shape[-1]) for part in parts]
        for out, part in zip(outs, parts):
            for row, values in zip(group, part):
                n = min(len(sequences[row]), len(values))
                out[row, :n] = values[:n]
    return outs[0], outs[1], outs[2:]


@dataclass
class BaseStates:
    """The base model's states (memory off) over rows of tokens, per layer up to the last one whose
    output `capture_rows` needs."""

    keys: list[torch.Tensor]  # per layer [B, N, kv heads, d], rotated
    values: list[torch.Tensor]
    outputs: list[torch.Tensor]  # per layer [B, N, H]
    a: torch.Tensor  # [B, N, I] the down_proj input at layer L


def prefix_states(edited: EditedModel, tokens: list[int]) -> BaseStates | None:
    """The one-row states of a prefix that recurs in every edit's batch, computed once per model.
    Attention is causal: what follows a prefix cannot change them."""
    if not tokens:
        return None
    cache = edited.prefix_states
    if tuple(tokens) not in cache:
        cache[tuple(tokens)] = base_states(edited, [list(tokens)], [None])
    return cache[tuple(tokens)]


def base_states(edited: EditedModel, tokens: list[list[int]], prefixes: list[BaseStates | None]) -> BaseStates:
    """Run the base model's layers (Llama family) over rows of `tokens`, each continuing the states of
    its prefix (None: from the first position); up to the layer above L whose input is the last the
    fast steps read."""
    base = edited.model.model
    width = max(len(seq) for seq in tokens)
    ids = torch.tensor([seq + [0] * (width - len(seq)) for seq in tokens])
    starts = torch.tensor([0 if p is None else p.a.shape[1] for p in prefixes])
    span = int(starts.max())
    slots, queries = torch.arange(span + width), torch.arange(width)
    # A query reads its own row's prefix slots and the new tokens up to itself.
    mask = torch.where(slots[None, None] < span, slots[None, None] < starts[:, None, None],
                       slots[None, None] - span <= queries[None, :, None]).unsqueeze(1)
    last = max(edited.layer, len(base.layers) - 2)
    out = BaseStates([], [], [], torch.empty(0))
    grabbed: list[torch.Tensor] = []
    handle = edited.proj.register_forward_pre_hook(lambda _module, args: grabbed.append(args[0]))
    try:
        with torch.no_grad():
            hidden = base.embed_tokens(ids)
            cos, sin = base.rotary_emb(hidden, starts[:, None] + queries[None])
            for index, layer in enumerate(base.layers[: last + 1]):
                kv_shape = (layer.self_attn.k_proj.out_features // layer.self_attn.head_dim, layer.self_attn.head_dim)
                cached = [hidden.new_zeros(len(tokens), span, *kv_shape) for _ in range(2)] if span else None
                for row, prefix in enumerate(prefixes):
                    if prefix is not None:
                        cached[0][row, : starts[row]], cached[1][row, : starts[row]] = prefix.keys[index][0], prefix.values[index][0]

                def merge(k, v, cached=cached):
                    return (k, v) if cached is None else (torch.cat([cached[0], k], 1), torch.cat([cached[1], v], 1))

                hidden, k, v = decoder_layer(layer, hidden, cos, sin, mask, merge)
                out.keys.append(k)
                out.values.append(v)
                out.outputs.append(hidden)
    finally:
        handle.remove()
    out.a = grabbed[0]
    return out


def prepare(edited: EditedModel, batch: TokenBatch) -> Prepared:
    """In-scope rows run through the whole model (the steps need the layers above L); out-of-scope
    rows only to L, from the cache. Padding positions hold zeros (no mask ever selects them)."""
    ids, _, prompt_mask, answer_mask = edited.pad(batch.sequences, batch.prompt_lens)
    in_scope = torch.tensor(batch.in_scope)
    rows, others = in_scope.nonzero().squeeze(1), (~in_scope).nonzero().squeeze(1)

    a, hidden, uppers = capture_rows(edited, batch, rows.tolist())
    for row, row_a in zip(others.tolist(), out_of_scope_inputs(edited, [batch.sequences[r] for r in others.tolist()])):
        a[row, : len(row_a)] = row_a
    apply_rows, apply_cols = (answer_mask & in_scope[:, None]).nonzero(as_tuple=True)
    rows, cols, targets = [], [], []
    for row, (seq, plen) in enumerate(zip(batch.sequences, batch.prompt_lens)):
        if batch.in_scope[row]:
            for pos in range(plen, len(seq)):
                rows.append(row)
                cols.append(pos - 1)
                targets.append(seq[pos])
    examples = EditExamples(a=a, prompt_mask=prompt_mask, answer_mask=answer_mask, in_scope=in_scope, key_rows=batch.key_rows,
                             anchors=batch.anchors, anchor_suffices=batch.anchor_suffices,
                             anchor_open_name=batch.anchor_open_name, key_tokens=batch.key_tokens)
    row_stats = mean_prompt_stats(edited.memory, a, prompt_mask)
    if edited.memory.reads_stored_inputs:
        read_as_served(a, row_stats, answer_mask, in_scope, batch.key_rows)
    return Prepared(ids, examples, row_stats, hidden, uppers, apply_rows, apply_cols, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets))


def read_as_served(a: torch.Tensor, row_stats: torch.Tensor, answer_mask: torch.Tensor, in_scope: torch.Tensor,
                   key_rows: tuple[int, ...]) -> None:
    """In place: the in-scope rows that are not key rows (the prefixed prompts) read the memory as a
    request routed to this edit is served (`EditMemory.reading`): with the first key prompt's context
    and last-prompt-token input. Their own tokens above and the layers after L stay theirs, so the
    edit learns an answer that holds whatever came before the question."""
    last = answer_mask.float().argmax(1)
    key = key_rows[0]
    for row in in_scope.nonzero().squeeze(1).tolist():
        if row not in key_rows:
            row_stats[row] = row_stats[key]
            a[row, last[row]] = a[key, last[key]]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _heads(proj: torch.nn.Module, x: torch.Tensor, head_dim: int, cos=None, sin=None) -> torch.Tensor:
    """[..., H] -> [..., heads, d], rotated when cos/sin are given (Llama's rotary embedding)."""
    out = proj(x).unflatten(-1, (-1, head_dim))
    if cos is not None:
        out = out * cos.unsqueeze(-2) + _rotate_half(out) * sin.unsqueeze(-2)
    return out


def decoder_layer(layer, hidden: torch.Tensor, cos, sin, mask: torch.Tensor, merge) -> tuple[torch.Tensor, ...]:
    """One Llama-family decoder layer over `hidden` [B, N, H] at rotary (cos, sin). `merge(k, v)` puts
    the new tokens' keys and values among all those they attend to ([B, S, kv heads, d] each), `mask`
    [B, 1, N, S] says which each may read. Returns the layer's output and the new keys and values."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    q = _heads(attn.q_proj, x, attn.head_dim, cos, sin)
    k, v = _heads(attn.k_proj, x, attn.head_dim, cos, sin), _heads(attn.v_proj, x, attn.head_dim)
    keys, values = merge(k, v)
    # grouped heads read their shared key/value head in place (3x faster than repeating them, CPU)
    with torch.autocast(hidden.device.type, enabled=False):  # under autocast: fp32, its bf16 backward is 7x slower (CPU)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).to(hidden.dtype), keys.transpose(1, 2).to(hidden.dtype), values.transpose(1, 2).to(hidden.dtype),
            attn_mask=mask, scale=attn.scaling, enable_gqa=attn.num_key_value_groups > 1,
        )
    hidden = hidden + attn.o_proj(out.transpose(1, 2).flatten(-2))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), k, v


class FastStepper:
    """Target logits recomputing only the answer span above the memory.

    Below layer L nothing depends on the memory; above it, prompt tokens before the answer span do not
    either (the memory does not act on them, and attention is causal). So their keys and values at
    every upper layer are computed once, and each step pushes only the answer-span tokens of the
    in-scope rows through layers L+1.., attending to those cached keys. Llama-family layers only
    (`supports`); other families train through `NaiveStepper`.
    """

    # Decoder layers whose attention `_layer` reproduces (q/k/v projections, rotary, grouped heads).
    LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")

    @classmethod
    def supports(cls, edited: EditedModel) -> bool:
        return all(type(layer).__name__ in cls.LAYERS for layer in edited.model.model.layers)

    def __init__(self, edited: EditedModel, prepared: Prepared, low_precision: LowPrecisionCopy | None = None):
        self.edited, self.p = edited, prepared
        base = edited.model.model
        self.layers = base.layers[edited.layer + 1 :]
        self.low_precision = low_precision
        ex = prepared.examples
        rows = ex.in_scope.nonzero().squeeze(1)
        starts = ex.answer_mask[rows].float().argmax(1)
        spans = ex.answer_mask[rows].sum(1)
        width = int(spans.max())
        offsets = torch.arange(width)
        self.valid = offsets[None] < spans[:, None]  # [R, A]
        self.rows = rows
        self.slab = torch.minimum(starts[:, None] + offsets[None], (starts + spans - 1)[:, None])  # [R, A] positions
        self.slab_rows = rows[:, None].expand_as(self.slab)
        # (row in the slab, position) of each valid slab token: where its keys go among the cached ones
        self.slab_index = (torch.arange(len(rows))[:, None].expand_as(self.slab)[self.valid], self.slab[self.valid])
        length = prepared.hidden.shape[1]
        positions = torch.arange(length)[None].expand(len(rows), length)
        cos, sin = base.rotary_emb(prepared.hidden, positions)
        picked = (torch.arange(len(rows))[:, None], self.slab)
        self.cos, self.sin = cos[picked], sin[picked]
        # Keys may be read only up to the query's own position.
        self.attend = (torch.arange(length)[None, None, :] <= self.slab[:, :, None]).unsqueeze(1)
        self.hidden = prepared.hidden[self.slab_rows, self.slab]
        self.a_slab = ex.a[self.slab_rows, self.slab]
        self.context = prepared.row_stats[self.slab_rows].flatten(0, 1)
        self.cache = self._base_keys_values(prepared, rows, cos, sin)
        # Target logits: slab offset j predicts the token after position slab[j].
        target_pos = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(prepared.target_rows, prepared.target_cols))}
        order = [(i, j) for i, r in enumerate(rows.tolist()) for j in range(width) if (r, int(self.slab[i, j])) in target_pos and self.valid[i, j]]
        order.sort(key=lambda ij: target_pos[(int(rows[ij[0]]), int(self.slab[ij]))])
        self.target_slab = (torch.tensor([i for i, _ in order]), torch.tensor([j for _, j in order]))

    def _base_keys_values(self, prepared: Prepared, rows, cos, sin):
        """Keys/values of every token at each upper layer with the memory off ([R, T, kv-heads, d])."""
        cache = []
        with torch.no_grad():
            for layer, hidden in zip(self.layers, prepared.upper_inputs):
                hidden = hidden[rows]
                attn, x = layer.self_attn, layer.input_layernorm(hidden)
                cache.append((_heads(attn.k_proj, x, attn.head_dim, cos, sin), _heads(attn.v_proj, x, attn.head_dim)))
        return cache

    def _layer(self, layer, hidden, keys, values):
        def merge(k, v):
            return (keys.index_put(self.slab_index, k[self.valid].to(keys.dtype)),
                    values.index_put(self.slab_index, v[self.valid].to(values.dtype)))

        return decoder_layer(layer, hidden, self.cos, self.sin, self.attend, merge)[0]

    def target_states(self, session: EditSession, exact: bool = True) -> torch.Tensor:
        """The final-norm states at the target positions; with `exact` False and a `low_precision`
        copy, the layers' products run in its dtype (the residual stream stays in the model's)."""
        base = self.edited.model.model
        delta = session.delta(self.a_slab.flatten(0, 1), self.context).unflatten(0, self.slab.shape)
        hidden = self.hidden + delta.to(self.hidden.dtype)
        low = self.low_precision if not exact else None
        with torch.autocast(hidden.device.type, dtype=low.dtype if low else None, enabled=low is not None):
            for layer, (keys, values) in zip(low.layers if low else self.layers, self.cache):
                hidden = self._layer(layer, hidden, keys, values)
        return base.norm(hidden[self.target_slab])

    def target_logits(self, session: EditSession) -> torch.Tensor:
        return self.edited.model.lm_head(self.target_states(session))


def step_dtype(option: str) -> torch.dtype | None:
    """The dtype of the fast steps' products for `MethodConfig.step_dtype` (None: the model's own)."""
    if option == "auto":
        native = any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return torch.bfloat16 if native else None
    dtype = getattr(torch, option)  # a name `MethodConfig` validated
    return None if dtype == torch.float32 else dtype


@dataclass
class LowPrecisionCopy:
    """The parts of a model the fast steps run in a lower precision, copied once per model: autocast
    would otherwise cast every weight again at every step."""

    dtype: torch.dtype
    layers: list[torch.nn.Module]  # the layers above L, their linear weights in `dtype`
    head_weight: torch.Tensor  # the output layer's weight, to rank candidate tokens with


def low_precision_copy(edited: EditedModel, dtype: torch.dtype) -> LowPrecisionCopy:
    if dtype not in edited.low_precision:
        layers = [deepcopy(layer) for layer in edited.model.model.layers[edited.layer + 1 :]]
        for module in (m for layer in layers for m in layer.modules()):
            if isinstance(module, torch.nn.Linear):
                module.to(dtype)
        edited.low_precision[dtype] = LowPrecisionCopy(dtype, layers, edited.model.lm_head.weight.detach().to(dtype))
    return edited.low_precision[dtype]


class CandidateHead:
    """The output layer restricted to the tokens that matter for the loss.

    With a 49k-token vocabulary and a few dozen target positions, full logits are half of a fast
    training step. Softmax over the target tokens plus every token that was among a position's
    `per_position` most likely ones equals the full softmax up to tokens of negligible probability.
    The candidate set starts from the first step's full logits (`widen`, ranked with `ranking`, the
    output weight or a lower-precision copy of it: the ranking only picks tokens) and grows whenever
    the full loss is computed (`exact_losses`): before the edit may stop, and at the last step.
    """

    def __init__(self, lm_head: torch.nn.Module, target_ids: torch.Tensor, ranking: torch.Tensor | None = None,
                 per_position: int = 128):
        self.lm_head, self.target_ids, self.per_position = lm_head, target_ids, per_position
        self.ranking = lm_head.weight if ranking is None else ranking
        self.vocab = target_ids.unique()
        self._select()

    def _select(self) -> None:
        self.weight = self.lm_head.weight[self.vocab]
        bias = getattr(self.lm_head, "bias", None)
        self.bias = None if bias is None else bias[self.vocab]
        self.local_targets = torch.searchsorted(self.vocab, self.target_ids)

    def _add_top(self, logits: torch.Tensor) -> None:
        top = logits.detach().topk(min(self.per_position, logits.shape[-1]), dim=-1).indices
        self.vocab = torch.cat([self.vocab, top.flatten()]).unique()
        self._select()

    def widen(self, states: torch.Tensor) -> None:
        """Add each position's most likely tokens to the candidates."""
        with torch.no_grad():
            self._add_top(F.linear(states.to(self.ranking.dtype), self.ranking))

    def losses(self, states: torch.Tensor) -> torch.Tensor:
        """Each target position's cross-entropy over the candidate tokens."""
        return F.cross_entropy(F.linear(states, self.weight, self.bias).float(), self.local_targets, reduction="none")

    def exact_losses(self, states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(states).float()
        self._add_top(logits)
        return F.cross_entropy(logits, self.target_ids, reduction="none")


class NaiveStepper:
    """Reference-style step: the whole model forward with the memory hooked in, all logits."""

    def __init__(self, edited: EditedModel, prepared: Prepared):
        self.edited, self.p = edited, prepared

    def target_logits(self, session: EditSession) -> torch.Tensor:
        p = self.p

        def add_delta(_module, _args, output):
            # the captured inputs: the same as this forward's, except where rows read as served (`read_as_served`)
            a = p.examples.a
            delta = session.delta(a[p.apply_rows, p.apply_cols], p.row_stats[p.apply_rows]).to(output.dtype)
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
    converged: bool  # reached the stop criterion; False: all `steps` ran and the answer may not be learned
    step_dtype: str  # what the steps' products ran in on this machine (`MethodConfig.step_dtype` resolved)
    record: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, torch.Tensor] | None = None  # `EditSession.written_columns`


def row_losses(losses: torch.Tensor, target_rows: torch.Tensor, rows: tuple[int, ...]) -> torch.Tensor:
    """Each of `rows`' mean target loss ([len(rows)])."""
    return torch.stack([losses[target_rows == row].mean() for row in rows])


def key_rows_loss(losses: torch.Tensor, target_rows: torch.Tensor, key_rows: tuple[int, ...]) -> torch.Tensor:
    """The key rows' mean of their own losses, added to the loss (`MethodConfig.key_row_loss`)."""
    return row_losses(losses, target_rows, key_rows).mean()


def stopping_loss(losses: torch.Tensor, target_rows: torch.Tensor, key_rows: tuple[int, ...]) -> float:
    """What early stopping compares with `stop_loss`: the mean target loss, and with `key_rows` the
    largest of it and each key row's own mean."""
    losses = losses.detach()
    parts = [losses.mean()[None]] + ([row_losses(losses, target_rows, key_rows)] if key_rows else [])
    return float(torch.cat(parts).max())


def train_edit(edited: EditedModel, batch: TokenBatch, naive: bool = False) -> EditOutcome:
    """Learn one edit into `edited.memory` (in place) and report how it went. An edit that does not
    reach the stop loss in `steps` keeps where it ended (`converged` False): starting it over from
    zero columns saved it but erased what every earlier edit sharing those columns had written there
    (CounterFact T = 1000: 4 such restarts, 24 facts with Rel < .5 against 11 without; README)."""
    start = time.perf_counter()
    cfg = edited.memory.config
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adam")
    prepared = prepare(edited, batch)
    fast = not naive and FastStepper.supports(edited)
    dtype = step_dtype(cfg.step_dtype) if fast else None
    low = low_precision_copy(edited, dtype) if dtype else None
    stepper = FastStepper(edited, prepared, low) if fast else NaiveStepper(edited, prepared)
    session = edited.memory.start_edit(prepared.examples)
    head = CandidateHead(edited.model.lm_head, prepared.target_ids, low.head_weight if low else None) if fast else None
    key_rows = batch.key_rows if cfg.key_row_loss else ()
    loss, steps, converged = optimise(session, stepper, head, prepared, key_rows, cfg)
    record = session.finish()
    steps_dtype = str(dtype or edited.model.dtype).removeprefix("torch.")
    return EditOutcome(loss=loss, steps=steps, seconds=time.perf_counter() - start, converged=converged,
                       step_dtype=steps_dtype, record=record, columns=session.written_columns())


OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def optimise(session: EditSession, stepper, head: CandidateHead | None, prepared: Prepared, key_rows: tuple[int, ...],
             cfg) -> tuple[float, int, bool]:
    """Up to `cfg.steps` optimiser steps on the session's parameters: (the last mean answer loss,
    steps taken, whether the stop criterion was reached)."""
    params = session.parameters()
    optimizer = OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_value, steps = float("nan"), 0
    for steps in range(1, cfg.steps + 1):
        aux = session.aux_loss(prepared.examples)
        aux_value = 0.0 if aux is None else float(aux.detach())
        if head is None:
            losses = F.cross_entropy(stepper.target_logits(session).float(), prepared.target_ids, reduction="none")
        else:
            states = stepper.target_states(session, exact=False)
            if steps == 1:
                head.widen(states)
            losses = head.losses(states)
            # Stopping is decided on the full softmax over states in the model's own precision.
            if steps == cfg.steps or session.done(stopping_loss(losses, prepared.target_rows, key_rows), aux_value):
                if stepper.low_precision is not None:
                    states = stepper.target_states(session)
                losses = head.exact_losses(states)
        target_loss = loss = losses.mean()
        if key_rows:
            loss = loss + key_rows_loss(losses, prepared.target_rows, key_rows)
        if aux is not None:
            loss = loss + aux
        loss_value, stop = float(target_loss.detach()), stopping_loss(losses, prepared.target_rows, key_rows)
        if session.done(stop, aux_value):
            return loss_value, steps, True
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        session.after_step()
    return loss_value, steps, False
