"""What every editing method provides: a pure-torch memory on one FFN down-projection.

The same memory object is used by the trainer, by the transformers reference path and by the vLLM
wrapper, so the routing rule and the memory's arithmetic exist exactly once per method.

A request is routed once, from its prompt, and keeps that route for every token it produces:

1. `token_stats(a)` turns each prompt token's down-projection input `a` into a statistic;
2. the caller averages those statistics over the prompt (in vLLM: across prefill chunks);
3. `route(mean_stats, mentions)` picks the memory slot for the request, or -1 for "no edit applies";
   `mentions` are the edits whose subject anchor the routing span names (`mentioned(tokens)`, taken
   from the span's token ids when the request is first seen; None for a method without anchors).
   A method that `routes_on_last_sentence` also takes the mean and mentions of the span's last
   sentence (`ChatFormat.last_sentence_start`; the whole span's for a span of one sentence), for
   requests the whole span routes nowhere;
4. `reading(route, mean_stats)` says what a routed request reads besides its own tokens: its
   `context` (by default its own prompt mean) and, optionally, an input to read at its last prompt
   token instead of that token's activation (MEMOIR: its edit's stored ones);
5. `delta(a, routes, context)` is the memory's contribution, added to the base output `W a`;
   `context` holds each token's request context from `reading` (a method may read it, MEMOIR can).

The memory acts only on the answer span: the last prompt token (which predicts the first answer
token) and every token after it. Prompt tokens before it always see the base model, so their KV
cache is the same whatever the route, and a route decided at the end of the prompt is never late.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Hashable, Sequence

import torch
from torch import nn

NO_ROUTE = -1

# Each row's last-sentence mean statistic [B, D] and `mentioned` edits (`EditMemory.route`).
LastSentence = tuple[torch.Tensor, Sequence["frozenset[int] | None"]]


@dataclass
class MethodConfig:
    """Hyper-parameters shared by both methods (the optimiser of one edit)."""

    layer: int = 22
    optimizer: str = "adam"  # adam (converges in ~8 steps here) or sgd (the papers)
    lr: float = 0.01
    steps: int = 30
    weight_decay: float = 1e-5
    grad_clip: float | None = None
    stop_loss: float = 0.02  # early stop once the target loss is this low
    # Weigh each key row (the edit as written, as a chat turn) again in the loss, by its own mean, and
    # stop only once each is itself at `stop_loss`: in the mean over all rows the prefixed rows repeat
    # the written form, so the chat turn ended well above it and is the first answer later edits
    # break (`MemoirConfig`).
    key_row_loss: bool = False
    seed: int = 0
    # Where the memory acts: "answer" (last prompt token onwards: prompt KV is route-independent, so
    # vLLM keeps chunked prefill) or "all" (every token, the papers' reference behaviour: better
    # retention over long edit streams here, slower training, and whole-prompt prefills in vLLM).
    act_on: str = "answer"
    # Teach each edit to end its answer (as written and as a chat turn) with the end-of-sequence token.
    # The memory keeps acting after the answer, so without it greedy decoding repeats the answer
    # ("winger winger winger ...": 0 of 20 ZsRE answers ended cleanly, 18 with it). Costs some
    # teacher-forced Gen on ZsRE dev (T=148: .956 -> .936; README "Ending answers").
    stop_after_answer: bool = True
    # Each edit also trains on its prompt behind this many short unrelated openings (`generate_prefixes`,
    # fixed per store), so that the answer holds whatever precedes the question. Every one is a
    # training row: it costs capture and step time alike.
    training_prefixes: int = 5
    # The products of the fast training steps (layers above L): "bfloat16", "float32" or "auto"
    # (bfloat16 where the CPU multiplies it natively: AVX512-BF16 or AMX). The residual stream,
    # attention and memory stay fp32, and an edit stops only once its loss computed entirely in the
    # model's precision is below `stop_loss`. On this project's 2-core box an edit is 1.37x faster (README).
    step_dtype: str = "auto"
    # Options added after stores were first written -> the behaviour those stores were trained with.
    predated: ClassVar[dict[str, Any]] = {"stop_after_answer": False, "training_prefixes": 5, "step_dtype": "float32"}

    def __post_init__(self) -> None:
        if self.step_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"step_dtype must be auto, float32 or bfloat16, got {self.step_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    @classmethod
    def from_stored(cls, values: dict[str, Any]) -> "MethodConfig":
        """A store's recorded options; ones it predates take the value it was trained with."""
        return cls.from_dict({**cls.predated, **values})


@dataclass
class EditExamples:
    """One edit's training batch, with everything below the memory already computed.

    Rows are right-padded sequences; row 0 is the bare edit; the prompts of `key_rows` (row 0 first,
    then e.g. the chat-formatted edit) give the edit's routing keys; `in_scope[i]` is False for
    out-of-scope rows. `a` is the down-projection input at the edited layer: it does not depend on
    the memory.
    """

    a: torch.Tensor  # [S, T, I]
    prompt_mask: torch.Tensor  # [S, T] bool: routing span (route statistics come from these)
    answer_mask: torch.Tensor  # [S, T] bool: where the memory acts (last prompt token onwards)
    in_scope: torch.Tensor  # [S] bool
    key_rows: tuple[int, ...] = (0,)
    anchors: tuple[tuple[int, ...], ...] = ()  # token ids of the edit's subject (`memserve.subjects`)
    anchor_suffices: bool = False  # the subject is most of the prompt: naming it is enough
    anchor_open_name: bool = False  # the prompt carries the subject on into a longer name
    # Each key row's routing-span token ids outside its subject (`subjects.Mentions.rest`): what the
    # edit asks about its subject (`memserve.relation`).
    key_tokens: tuple[tuple[int, ...], ...] = ()


class EditSession:
    """Trainable view of the memory while one edit is learned."""

    def parameters(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def delta(self, a: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Memory output for the edit's own tokens ([N, I] -> [N, H]) under training; `context` is
        each token's row mean statistic, as in `EditMemory.delta`."""
        raise NotImplementedError

    def aux_loss(self, examples: EditExamples) -> torch.Tensor | None:
        return None

    def done(self, target_loss: float, aux_loss: float) -> bool:
        """Early stop: the edit is learned well enough."""
        raise NotImplementedError

    def after_step(self) -> None:
        pass

    def finish(self) -> dict[str, Any]:
        """Write the learned values into the memory; returns what to record for the edit
        (a bool tensor [I] or [keys, I] under "key" is stored as the edit's routing key(s))."""
        raise NotImplementedError

    def written_columns(self) -> dict[str, torch.Tensor] | None:
        """After `finish`: per tensor of the memory's `column_tensors`, the only columns this edit
        changed, so a commit compares and writes just those; None: any may have changed."""
        return None


class EditMemory(nn.Module):
    """Base class of a method's memory. Subclasses set `method` and `config_class`."""

    method: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    routes_are_edits: ClassVar[bool] = True  # route k is edit k (MEMOIR); else a memory slot (WISE)

    @property
    def reads_stored_inputs(self) -> bool:
        """Whether `reading` replaces a routed request's own statistics with the edit's stored ones
        (the trainer then teaches every in-scope row as it will be served)."""
        return False

    def __init__(self, config: MethodConfig, base_weight: torch.Tensor):
        super().__init__()
        self.config = config
        self.hidden_size, self.intermediate_size = base_weight.shape
        self.feature_range: tuple[int, int] | None = None  # `shard_features`; None: all features
        self._served: dict[str, tuple] = {}  # `served`: name -> (sources, stamp, tensor)

    # --- routing and inference -------------------------------------------------------------
    @property
    def num_edits(self) -> int:
        raise NotImplementedError

    def served(self, name: str, device: torch.device, make: Callable[[], torch.Tensor], *sources: torch.Tensor,
               key: Hashable = None) -> torch.Tensor:
        """A tensor the delta reads where the activations are: `make()` (derived from `sources`, e.g.
        this rank's features of it) on `device`. Made again only when a source is replaced or changed
        in place (its version counter), or `device`, `key` or `feature_range` change; on the CPU it is
        often the source itself. So the memory follows the served model's device while its state, which
        routing, training and the store read, stays on the host."""
        # (a tensor made under inference mode, e.g. WISE's routable task vectors built inside a vLLM
        # forward, has no version counter: it is never changed in place, only replaced)
        versions = tuple(None if source.is_inference() else source._version for source in sources)
        stamp = (device, key, self.feature_range, versions)
        hit = self._served.get(name)
        if hit is None or hit[1] != stamp or any(old is not new for old, new in zip(hit[0], sources)):
            hit = self._served[name] = (sources, stamp, make().to(device))
        return hit[2]

    def placed(self, name: str, device: torch.device) -> torch.Tensor:
        """The state tensor `name` as it is, on `device` (`served`)."""
        tensor = getattr(self, name)
        return self.served(name, device, lambda: tensor, tensor)

    def rank_background(self, device: torch.device) -> torch.Tensor:
        """The method's `background` (mean `a` over unrelated prompts, `calibrate`) on this rank's
        features (`feature_range`), on `device` (`served`)."""
        start, end = self.feature_range or (0, self.intermediate_size)
        return self.served("rank_background", device, lambda: self.background[start:end], self.background)

    def token_stats(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mentioned(self, tokens: Sequence[int], continues_name: Callable[[int], bool] | None = None
                  ) -> frozenset[int] | None:
        """The edits whose subject anchor occurs in a routing span's token ids (`continues_name`: the
        tokens that make it part of a longer name, `ChatFormat.continues_name`); None: this memory
        does not gate on subjects (every slot stays eligible)."""
        return None

    @property
    def routes_on_last_sentence(self) -> bool:
        """Whether `route` reads `last_sentence` (else callers need not compute it)."""
        return getattr(self.config, "last_sentence_fallback", False)

    def route(self, mean_stats: torch.Tensor, mentions: Sequence[frozenset[int] | None] | None = None,
              last_sentence: LastSentence | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, D] and each row's `mentioned` edits (and its `LastSentence`) -> (routes [B] long,
        NO_ROUTE where nothing applies; scores [B]). Without `mentions` no anchored edit is eligible."""
        raise NotImplementedError

    def candidates(self, mean_stats: torch.Tensor, mentions: frozenset[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Why `route` decides as it does, for one prompt mean [D]: every routable slot as (slots,
        scores, thresholds, eligible), in the order `route` prefers them (for explanations, not for
        serving)."""
        raise NotImplementedError

    def delta(self, a: torch.Tensor, routes: torch.Tensor, context: torch.Tensor | None = None,
              fixed_shapes: bool = False) -> torch.Tensor:
        """[N, I], [N] (, [N, D]) -> [N, H]. `fixed_shapes`: no host synchronisation and the same
        device ops whatever the routes (the dense serving path, which a captured graph replays)."""
        raise NotImplementedError

    def relation_scores(self, mentions: frozenset[int] | None) -> torch.Tensor | None:
        """[E] per slot, how closely a span (its `mentioned` edits and the rest of its tokens) asks
        what the slot's edit asks; NaN for slots not checked so (None: the method checks none; see
        `MemoirConfig.relation_check`)."""
        return None

    def route_label(self, route: int) -> str:
        """Human-readable name of a route, reported by the server and `eval`."""
        raise NotImplementedError

    def shard_features(self, start: int, end: int) -> None:
        """Serve one tensor-parallel rank (`feature_range`): from now on `delta` takes `a` restricted to
        the features [start, end) and returns this rank's part of the delta, the ranks' parts summing
        to the whole (added before the layer's all-reduce); `context` and `route` keep full prompt
        means (the serving runtime gathers them across ranks)."""
        raise NotImplementedError(f"a {self.method} memory cannot be served with tensor parallelism")

    def reading(self, route: int, mean_stats: torch.Tensor | None,
                chat_turn: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What a request routed to `route` reads besides its own tokens, given its prompt mean
        `mean_stats` [D] (None: unknown) and whether it is a chat turn (its routing span ends before
        its prompt, `ChatFormat.routing_span`): its `context` (None: `neutral_context`) and the input [I] to
        read at its last prompt token instead of that token's own activation (restricted to
        `feature_range`; None: its own). By default a request reads its own statistics."""
        return mean_stats, None

    def neutral_context(self) -> torch.Tensor:
        """The `context` of a request whose prompt statistics are unknown: one that adds nothing."""
        return torch.zeros(self.intermediate_size)

    # --- training ---------------------------------------------------------------------------
    def start_edit(self, examples: EditExamples) -> EditSession:
        raise NotImplementedError

    # --- persistence ------------------------------------------------------------------------
    def calibrate(self, background_mean: torch.Tensor, model: str | None = None,
                  input_embeddings: torch.Tensor | None = None) -> None:
        """Called once when a store is created, with the mean `a` over unrelated prompts, the
        model's `models.model_id` and its input embeddings [V, E]."""

    # State tensors an edit changes a few columns of (of their 2-D view): the store keeps them by column.
    column_tensors: tuple[str, ...] = ()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Dense state to persist after each edit (per-edit keys are stored with the edit)."""
        raise NotImplementedError

    def load_anchors(self, anchors: Sequence[tuple[Sequence[Sequence[int]], bool, bool]]) -> None:
        """Each edit's subject anchor variants, whether naming them suffices and whether its prompt
        carries the name on, in edit order (a method without anchors ignores them)."""

    def load_state(self, tensors: dict[str, torch.Tensor], keys: torch.Tensor, owners: torch.Tensor) -> None:
        """Restore from `state_tensors()` output and the stored routing keys [K, I] (may be empty),
        `owners[j]` being the edit (in edit order) that key j belongs to."""
        raise NotImplementedError


def mean_prompt_stats(memory: EditMemory, a: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Average `token_stats` over each row's routing span: [B, T, I], [B, T] -> [B, D]."""
    stats = memory.token_stats(a.reshape(-1, a.shape[-1])).reshape(*a.shape[:2], -1)
    weights = prompt_mask.to(stats.dtype).unsqueeze(-1)
    return (stats * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def route_explanation(memory: EditMemory, mean_stats: torch.Tensor, top: int = 5,
                      mentions: frozenset[int] | None = None,
                      last_sentence: tuple[torch.Tensor, frozenset[int] | None] | None = None) -> dict:
    """The decision of `memory.route` for one prompt mean [D] (its span's `mentions`, its last
    sentence's mean and mentions) and the `top` slots nearest to what decided it (the span, or its
    last sentence when only that routes), with their scores against their thresholds and whether
    the question names their subject: what `memserve route` and `POST /v1/memserve/route` show."""
    tail = None if last_sentence is None else (last_sentence[0][None], [last_sentence[1]])
    routes, scores = memory.route(mean_stats[None], [mentions], tail)
    route = int(routes[0])
    on_tail = tail is not None and route != NO_ROUTE and int(memory.route(mean_stats[None], [mentions])[0][0]) == NO_ROUTE
    if on_tail:
        mean_stats, mentions = last_sentence
    slots, candidate_scores, thresholds, eligible = memory.candidates(mean_stats, mentions)
    relations = memory.relation_scores(mentions)
    candidates = []
    for slot, score, threshold, named in zip(slots[:top], candidate_scores[:top], thresholds[:top], eligible[:top]):
        row = {"route": int(slot), "edit": memory.route_label(int(slot)), "score": float(score),
               "threshold": float(threshold), "subject_named": bool(named), "passes": bool(named and score >= threshold)}
        if relations is not None and not relations[slot].isnan():
            row["relation"], row["relation_threshold"] = float(relations[slot]), memory.relation.threshold
            row["passes"] &= row["relation"] >= row["relation_threshold"]
        candidates.append(row)
    return {"route": route, "edit": memory.route_label(route), "score": float(scores[0]),
            "routed_on": "last sentence" if on_tail else "span", "candidates": candidates}
