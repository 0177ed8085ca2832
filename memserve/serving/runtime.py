"""Per-request routing of a memory inside vLLM's flat token batch (no vLLM imports here).

vLLM runs one forward over a flat batch: every scheduled request contributes a contiguous run of
tokens (a whole prompt, a prefill chunk, or one decode token), described by `BatchPlan`. The memory
API (`methods.base`) routes a request once, from the mean of `token_stats` over its prompt tokens, and
applies the routed memory to the answer span only (the last prompt token and everything after it).

`MemoryRuntime` keeps, per live request id, a `RequestRoute`:
- while the route is unknown: the running sum and count of `token_stats` over the routing-span
  positions seen so far (the whole prompt, or a chat prompt's last user message: `memserve.chat`), and
  `next_pos`, the first span position not yet counted. A prefill chunk adds its span positions
  >= `next_pos` (so a chunk recomputed after preemption is not counted twice);
- for a memory that `routes_on_last_sentence` and a span of several sentences, the same sums over
  the span's last sentence (positions >= `sentence_start`, found from the span's token ids);
- when a chunk reaches the last prompt position, `memory.route` is called on the mean (all requests
  that complete their prompt in this step are routed in one call) and the route is fixed for the rest
  of the request: recomputation after preemption reuses it, so a request never changes route.
Only then does the answer span of that request receive `memory.delta`. Prompt tokens before the last
one always get the base output, so prompt KV never depends on the route.

Hot reload (`swap`): a new memory serves the requests first seen after the swap; every live request
keeps the memory object it started with (`RequestRoute.memory`) until it ends, so a request's route,
statistics and delta never mix two store versions. A batch may then hold requests of several
memories: stats, routing and delta run once per memory present in the batch.

States are dropped when the runner removes a request (`free`) or no longer knows it (`prune`); the
decided route moves to a bounded `recent` table so a caller can ask afterwards which edit served a
request (`route_info`).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Container, Sequence

import numpy as np
import torch

from memserve.chat import ChatFormat
from memserve.methods import NO_ROUTE, EditMemory, route_explanation

from .options import RequestOptions

logger = logging.getLogger("vllm.memserve")  # under "vllm": shown by vLLM's log handler

MAX_OPTION_WARNINGS = 20  # refused request options logged one by one; later ones are only counted


@dataclass
class BatchPlan:
    """The requests of one forward, in flat-batch order."""

    req_ids: Sequence[str]
    starts: np.ndarray  # [R + 1] token offsets (query_start_loc)
    first_pos: np.ndarray  # [R] sequence position of each request's first scheduled token
    prompt_lens: np.ndarray  # [R] routing prompt length of each request
    # [R] each request's parsed options; read (like `route_spans`) only when a request is first seen.
    options: Sequence[RequestOptions | None] | None = None
    # [R, 2] each request's routing span [start, end) within its prompt (`ChatFormat.routing_span`);
    # read when a request is first seen; None: the whole prompt.
    route_spans: np.ndarray | None = None
    # each request's routing-span token ids (for `EditMemory.mentioned`), read when it is first seen;
    # None: unknown (no anchored edit can then be reached).
    route_tokens: Sequence[Sequence[int] | None] | None = None
    # [R] where each request's routing span's last sentence starts (`ChatFormat.last_sentence_start`,
    # as a prompt position), read when it is first seen; None: the span is one sentence.
    sentence_starts: np.ndarray | None = None


@dataclass
class RequestRoute:
    stats_sum: torch.Tensor | None = None
    count: int = 0
    next_pos: int = 0
    route: int | None = None  # None until the last prompt token was processed (or forced)
    score: float = 0.0
    settled: bool = False  # the prompt's statistics are final (route and `mean_stats` will not change)
    complete: bool = True  # False if some prompt positions were never computed (cannot route exactly)
    prompt_len: int = 0
    span_end: int = 0  # routing statistics come from positions [span start, span_end)
    end_pos: int = 0  # one past the highest position processed so far
    mean_stats: torch.Tensor | None = None  # the prompt mean routed on
    context: torch.Tensor | None = None  # what the memory reads as `context` (`EditMemory.reading`)
    last_input: torch.Tensor | None = None  # read at the last prompt token instead of its own input, if set
    memory: EditMemory | None = None  # the memory current when the request was first seen; serves all of it
    version: int | None = None  # store version of that memory
    forced: bool = False  # the route came from the request's options, not from its prompt
    report_tag: str | None = None  # `options.REPORT_TAG_ARG` of the HTTP request it belongs to
    explain: int | None = None  # `options.EXPLAIN_ARG`: keep `explanation` with this many nearest slots
    explanation: dict | None = None  # `methods.route_explanation` of the prompt mean, when asked
    mentions: frozenset[int] | None = None  # the edits whose subject its routing span names
    # The span's last sentence (`EditMemory.routes_on_last_sentence`): its first position (None: the
    # span is one sentence, or the memory does not route on it), running sums, mean and mentions.
    sentence_start: int | None = None
    sentence_sum: torch.Tensor | None = None
    sentence_count: int = 0
    sentence_stats: torch.Tensor | None = None
    sentence_mentions: frozenset[int] | None = None

    def last_sentence(self) -> tuple[torch.Tensor, frozenset[int] | None]:
        """`EditMemory.route`'s `last_sentence` for this request (the whole span's for one sentence)."""
        if self.sentence_start is None:
            return self.mean_stats, self.mentions
        return self.sentence_stats, self.sentence_mentions


@dataclass
class RouteInfo:
    route: int
    label: str
    score: float
    version: int | None = None  # store version of the memory that served the request
    explanation: dict | None = None

    @classmethod
    def of(cls, state: RequestRoute) -> "RouteInfo":
        return cls(state.route, state.memory.route_label(state.route), state.score, state.version, state.explanation)

    def to_dict(self) -> dict:
        out = {"route": self.route, "edit": self.label, "score": self.score, "version": self.version}
        return out if self.explanation is None else {**out, "explanation": self.explanation}


def external_id(req_id: str) -> str:
    """vLLM v1 appends '-' + 8 random characters to the caller's request id."""
    head, sep, tail = req_id.rpartition("-")
    return head if sep and len(tail) == 8 else req_id


CHILD_ID = re.compile(r"(\d+)_(.*)")  # vLLM's id of sample k of a request with n > 1: "{k}_{parent id}"


def choice_of(req_id: str) -> tuple[str, int, int]:
    """(response id, prompt index, sample index) of an OpenAI server request from its engine id:
    completions run prompt i as "cmpl-{id}-{i}", chat as "chatcmpl-{id}"; sample k of n > 1 is
    "{k}_" + that, and the engine appends "-" + 8 random characters."""
    rest, sample = external_id(req_id), 0
    child = CHILD_ID.fullmatch(rest)
    if child:
        sample, rest = int(child.group(1)), child.group(2)
    if rest.startswith("cmpl-"):
        head, _, index = rest.rpartition("-")
        if index.isdigit() and head:
            return head, int(index), sample
    return rest, 0, sample


class RouteLog:
    """Routes of finished requests by internal id (unique), with views by the caller's id (clients may
    reuse ids: ambiguous ids answer nothing rather than another client's route), by response id
    (`choice_of`) and by the server's report tag (one HTTP request). Bounded, oldest out."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[str, tuple[RouteInfo, str | None]] = OrderedDict()
        self.views: dict[str, dict[str, set[str]]] = {"external": {}, "response": {}, "tag": {}}

    @staticmethod
    def _keys(req_id: str, tag: str | None) -> dict[str, str | None]:
        return {"external": external_id(req_id), "response": choice_of(req_id)[0], "tag": tag}

    def add(self, req_id: str, info: RouteInfo, tag: str | None) -> None:
        self.entries[req_id] = (info, tag)
        for view, key in self._keys(req_id, tag).items():
            if key is not None:
                self.views[view].setdefault(key, set()).add(req_id)
        while len(self.entries) > self.capacity:
            old, (_, old_tag) = self.entries.popitem(last=False)
            for view, key in self._keys(old, old_tag).items():
                ids = self.views[view].get(key)
                if ids is not None:
                    ids.discard(old)
                    if not ids:
                        del self.views[view][key]

    def get(self, req_id: str) -> RouteInfo | None:
        entry = self.entries.get(req_id)
        return None if entry is None else entry[0]

    def find(self, view: str, key: str) -> set[str]:
        return self.views[view].get(key, set())

    def __len__(self) -> int:
        return len(self.entries)


class MemoryRuntime:
    """Routing state of one memory attached to one model instance."""

    def __init__(self, memory: EditMemory, chat: ChatFormat | None = None, max_recent: int = 65536,
                 version: int | None = None, dense: bool | None = None, device: torch.device | str = "cpu",
                 max_tokens: int = 0, shard: tuple[int, int] | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        # Tensor parallelism: this rank holds the features `shard` = [start, end) of `a`; `gather`
        # concatenates every rank's [R, width] prompt statistics along the features (a collective:
        # each rank runs the same steps with the same plan, so all call it together and then route
        # alike). Every memory served is restricted to the shard (`EditMemory.shard_features`).
        self.shard, self.gather = shard, gather
        if shard is not None:
            memory.shard_features(*shard)
        self.memory = memory  # serves requests first seen from now on (see `swap`)
        self.version = version
        self.chat = chat
        self.states: dict[str, RequestRoute] = {}
        self.recent = RouteLog(max_recent)
        self.plan: BatchPlan | None = None
        self._warned_gap = False
        self.steps = 0  # forwards that went through `apply` with a plan (for tests / diagnostics)
        self.routing_steps = 0  # of those, the steps that read activations on the host (`needs_routing`)
        # How the delta reaches the batch (`TokenInputs`): "dense" over every row from per-token buffers
        # (no host work, replayable by a captured graph: any device but the CPU), or "compact" over the
        # routed rows only (cheaper on the CPU, where nothing is captured). None: chosen by `device`,
        # the model's. `max_tokens`: the most tokens one forward holds (the buffers' first size).
        self.device = torch.device(device)
        self.dense = dense if dense is not None else self.device.type != "cpu"
        self.max_tokens = max_tokens
        self._tracked: list[tuple[RequestRoute, tuple[int, int] | None, bool]] = []
        self._members: list[tuple[EditMemory, list[int]]] = []  # the step's requests by memory (with edits)
        self._routing = False  # `needs_routing()` of the current step, decided in `begin_step`
        self._inputs: list[tuple[EditMemory, TokenInputs]] = []
        self.recomputes = 0  # chunks that re-ran already processed positions (preemption)
        self.refused_options = 0  # requests served without edits because their options were invalid
        # Metrics (`/metrics`): routing decisions, hits per route label, time spent in `begin_step` and `apply`.
        self.routed = 0
        self.unrouted = 0
        self.hits: Counter[str] = Counter()
        self.apply_seconds = 0.0
        # act_on="all" (memory on every token, as in the papers' code): prompt chunks processed before
        # the route was known got the base output; exact only if each prompt is prefilled in one chunk
        # (serve with chunked prefill off). Counted here and warned about once.
        self.inexact = 0
        # `_step_inputs`' last (key, objects whose ids the key holds, kept alive so ids stay unique, inputs)
        self._inputs_cache: tuple = (None, None, None)
        self._buffers: list[TokenBuffers] = []  # the dense path's persistent per-token buffers, one per memory

    def swap(self, memory: EditMemory, version: int | None = None) -> None:
        """Serve `memory` to requests first seen from now on; live requests keep theirs (module doc)."""
        if self.shard is not None:
            memory.shard_features(*self.shard)
        self.memory, self.version = memory, version

    def pinned_memories(self) -> int:
        """Memories other than the current one still serving live requests (after a swap)."""
        return len({id(s.memory) for s in self.states.values() if s.memory is not self.memory})

    def routing_span(self, prompt: Sequence[int] | None, prompt_len: int) -> tuple[int, int]:
        """Where in its first `prompt_len` tokens a request is routed from (see `memserve.chat`)."""
        if self.chat is None or prompt is None:
            return 0, prompt_len
        return self.chat.routing_span(list(prompt[:prompt_len]))

    def last_sentence_start(self, span_tokens: Sequence[int]) -> int:
        """Offset of the last sentence in a routing span's tokens, for a memory that routes on it
        (`ChatFormat.last_sentence_start`); 0 otherwise."""
        if self.chat is None or not self.memory.routes_on_last_sentence:
            return 0
        return self.chat.last_sentence_start(span_tokens)

    # --- lifecycle, driven by the model runner ----------------------------------------------------
    def begin_step(self, plan: BatchPlan | None) -> None:
        """Before the forward, from the plan alone (host): each request's bookkeeping for this step and,
        when the step only decodes, its per-token inputs (so a replayed graph reads current buffers)."""
        started = time.perf_counter()
        self.plan = plan
        self._tracked = [] if plan is None else [self._track(plan, i) for i in range(len(plan.req_ids))]
        groups: dict[int, list[int]] = {}
        for i, (state, _, _) in enumerate(self._tracked):
            if state.memory.num_edits:
                groups.setdefault(id(state.memory), []).append(i)
        self._members = [(self._tracked[members[0]][0].memory, members) for members in groups.values()]
        self._routing = any(rows is not None or decides for _, rows, decides in self._tracked)
        self._inputs = [] if plan is None or self._routing else self._step_inputs()
        self.apply_seconds += time.perf_counter() - started

    def end_step(self) -> None:
        self.plan, self._tracked, self._members, self._inputs, self._routing = None, [], [], [], False

    def needs_routing(self) -> bool:
        """Whether this step reads activations on the host: some request adds routing-span statistics
        or ends its prompt. False on steps that only decode: those only read the per-token buffers."""
        return self._routing

    def free(self, req_id: str) -> None:
        state = self.states.pop(req_id, None)
        if state is not None and state.route is not None:
            self.recent.add(req_id, RouteInfo.of(state), state.report_tag)

    def prune(self, live: Container[str]) -> None:
        for req_id in [r for r in self.states if r not in live]:
            self.free(req_id)

    def route_info(self, req_id: str) -> RouteInfo | None:
        """Route of a live or recently finished request, by its internal id or the caller's id; None
        when unknown, not decided yet, or when the caller's id names several requests (clients may
        reuse ids: a report must never be another request's)."""
        state = self.states.get(req_id)
        if state is not None:
            return RouteInfo.of(state) if state.route is not None else None
        if req_id in self.recent.entries:
            return self.recent.get(req_id)
        matches = [rid for rid in self.states if external_id(rid) == req_id]
        matches += self.recent.find("external", req_id)
        return self.route_info(matches[0]) if len(matches) == 1 else None

    def response_routes(self, key: str) -> list[tuple[str, RouteInfo | None]]:
        """(internal id, route) of every engine request of one HTTP request, found by its report tag
        or by its response id (which clients may reuse: the caller must treat repeats as ambiguous)."""
        live = [rid for rid, state in self.states.items() if state.report_tag == key or choice_of(rid)[0] == key]
        ids = set(live) | self.recent.find("tag", key) | self.recent.find("response", key)
        return [(rid, self.route_info(rid)) for rid in sorted(ids)]

    def metrics(self, top_edits: int) -> dict:
        """Counters for `/metrics`: decisions since start, the `top_edits` most hit routes."""
        return {"routed": self.routed, "unrouted": self.unrouted, "apply_seconds": self.apply_seconds,
                "steps": self.steps, "refused_options": self.refused_options,
                "hits": dict(self.hits.most_common(top_edits)), "routes_hit": len(self.hits)}

    def memory_slots(self, memory: EditMemory | None = None) -> int:
        """Number of routable slots (MEMOIR: edits; WISE: memories incl. the side memory)."""
        memory = memory or self.memory
        candidates = None if memory.routes_are_edits else getattr(memory, "_candidates", None)
        return int(candidates()[1].numel()) if candidates else memory.num_edits

    # --- the forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """`out` = base down_proj output [N, H] for the flat batch whose inputs are `a` [N, I]: the two
        halves the compiled wrapper runs as separate ops, `route_step` then `add_delta`."""
        self.route_step(a)
        return self.add_delta(out, a)

    @torch.no_grad()
    def route_step(self, a: torch.Tensor) -> None:
        """Host half of a step: add span statistics, route the requests whose prompt ends now (only
        on `needs_routing` steps) and set the step's per-token routes. vLLM must run it outside any
        captured graph (`layers.ROUTE_OP` is a splitting op)."""
        if self.plan is None:
            return
        started = time.perf_counter()
        self.steps += 1
        if self.needs_routing():
            self.routing_steps += 1
            for memory, members in self._members:
                self._route(memory, members, a)
            self._inputs = self._step_inputs()
        self.apply_seconds += time.perf_counter() - started

    @torch.no_grad()
    def add_delta(self, out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Device half of a step: `out` plus each memory's delta on its routed answer-span tokens, from
        the inputs `route_step` set. No host work and no host synchronisation on the dense path."""
        started = time.perf_counter()
        for memory, inputs in self._inputs:
            out = inputs.add_to(memory, out, a)
        self.apply_seconds += time.perf_counter() - started
        return out

    def _new_state(self, plan: BatchPlan, i: int) -> RequestRoute:
        plen = int(plan.prompt_lens[i])
        span = (0, plen) if plan.route_spans is None else (int(plan.route_spans[i][0]), int(plan.route_spans[i][1]))
        state = RequestRoute(next_pos=span[0], prompt_len=plen, span_end=min(span[1], plen), memory=self.memory,
                             version=self.version)
        tokens = None if plan.route_tokens is None else plan.route_tokens[i]
        names = None if self.chat is None else self.chat.continues_name
        state.mentions = None if tokens is None else self.memory.mentioned(tokens, names)
        sentence = None if plan.sentence_starts is None else int(plan.sentence_starts[i])
        if self.memory.routes_on_last_sentence and sentence is not None and span[0] < sentence < state.span_end:
            state.sentence_start = sentence
            state.sentence_mentions = None if tokens is None else self.memory.mentioned(tokens[sentence - span[0]:], names)
        options = None if plan.options is None else plan.options[i]
        if options is not None and options.problem is None and options.forced and not NO_ROUTE <= options.route < self.memory_slots():
            # the slots changed (hot reload) since the options were checked: refuse, never raise
            options = RequestOptions(route=NO_ROUTE, problem=f"forced route {options.route} is not a memory slot now")
        if options is not None:
            state.report_tag, state.explain = options.report_tag, options.explain
            if options.problem is not None:
                self._refuse_options(plan.req_ids[i], options.problem)
            if options.forced:
                state.route, state.score, state.forced = options.route, float("nan"), True
        if state.route is None and not self.memory.num_edits:
            state.route = NO_ROUTE  # nothing to route to, now or later in this request's life
        # a forced route still reads its prompt's statistics (the memory's `context`), as a routed one does
        state.settled = state.route == NO_ROUTE
        self.unrouted += state.settled  # decided now: counted once, as `_route` counts the others
        return state

    def _refuse_options(self, req_id: str, problem: str) -> None:
        self.refused_options += 1
        if self.refused_options <= MAX_OPTION_WARNINGS:
            logger.warning("memserve: request %s is served without edits: %s%s", req_id, problem,
                           " (further refusals are only counted)" if self.refused_options == MAX_OPTION_WARNINGS else "")

    def _track(self, plan: BatchPlan, i: int) -> tuple[RequestRoute, tuple[int, int] | None, bool]:
        """Request i's state (created when first seen) after this chunk's bookkeeping, the flat rows
        [lo, hi) of its routing-span tokens not yet counted, and whether its prompt ends now."""
        rid = plan.req_ids[i]
        state = self.states.get(rid)
        if state is None:
            state = self.states[rid] = self._new_state(plan, i)
        s, e = int(plan.starts[i]), int(plan.starts[i + 1])
        p0 = int(plan.first_pos[i])
        end_pos = p0 + (e - s)
        if p0 < state.end_pos:
            self.recomputes += 1
        state.end_pos = max(state.end_pos, end_pos)
        if state.settled:
            return state, None, False
        rows = None
        lo, hi = max(p0, state.next_pos), min(end_pos, state.span_end)
        if min(p0, state.span_end) > state.next_pos:  # span positions that were never computed
            state.complete = False
        if hi > lo:
            rows = (s + lo - p0, s + hi - p0)
            state.next_pos = hi
        decides = end_pos >= state.prompt_len
        if decides and acts_on_all(state.memory) and p0 > 0:
            self.inexact += 1
            if self.inexact == 1:
                logger.warning(
                    "memserve: act_on='all' but request %s was prefilled in chunks; its earlier prompt "
                    "chunks saw the base model. Disable chunked prefill for exact results.", rid)
        return state, rows, decides

    def _route(self, memory: EditMemory, members: list[int], a: torch.Tensor) -> None:
        """Add this step's span statistics of `members` (requests served by `memory`) and settle those
        whose prompt ends in this step: route them (unless forced) and keep their prompt mean."""
        tracked, plan = self._tracked, self.plan
        states = [state for state, _, _ in tracked]
        spans = [(i, tracked[i][1]) for i in members if tracked[i][1] is not None]
        if spans:  # span statistics are summed where the activations are; only prompt means reach the host
            rows = torch.cat([torch.arange(lo, hi) for _, (lo, hi) in spans])
            seg = torch.cat([torch.full((hi - lo,), i, dtype=torch.long) for i, (lo, hi) in spans])
            stats = memory.token_stats(a[rows.to(a.device)])
            sums = stats.new_zeros(len(states), stats.shape[1]).index_add_(0, seg.to(a.device), stats)
            counts = torch.bincount(seg, minlength=len(states)).tolist()
            for i, _ in spans:
                state = states[i]
                state.stats_sum = sums[i].clone() if state.stats_sum is None else state.stats_sum + sums[i]
                state.count += counts[i]
            self._add_last_sentences(spans, rows, seg, stats)

        deciders = [i for i in members if tracked[i][2]]
        known = [i for i in deciders if states[i].complete and states[i].count > 0]
        means = {}
        if known:
            local = [states[i].stats_sum / states[i].count for i in known]
            local += [states[i].sentence_sum / states[i].sentence_count for i in known if states[i].sentence_start is not None]
            local = torch.stack(local)  # one gather for the spans and their last sentences
            local = iter((local if self.gather is None else self.gather(local)).cpu())  # routing runs on the host
            means = dict(zip(known, local))
            for i in known:
                if states[i].sentence_start is not None:
                    states[i].sentence_stats = next(local)
        for i in deciders:
            state = states[i]
            state.settled = True
            if i in known:
                state.mean_stats = means[i]
                if state.explain:
                    state.explanation = route_explanation(memory, state.mean_stats, state.explain, state.mentions,
                                                          state.last_sentence() if memory.routes_on_last_sentence else None)
            state.stats_sum = state.sentence_sum = None  # no longer needed
            if state.forced:
                continue
            if i not in known:
                state.route, state.score = NO_ROUTE, 0.0
                if not self._warned_gap:
                    self._warned_gap = True
                    logger.warning(
                        "memserve: request %s skipped routing-span tokens (a prefix-cache hit inside the span "
                        "should not happen: see prefix_cache.py); it is served without edits.", plan.req_ids[i])
        routable = [i for i in known if not states[i].forced]
        if routable:
            sentences = None
            if memory.routes_on_last_sentence:
                tails = [states[i].last_sentence() for i in routable]
                sentences = (torch.stack([mean for mean, _ in tails]), [named for _, named in tails])
            routes, scores = memory.route(torch.stack([states[i].mean_stats for i in routable]),
                                          [states[i].mentions for i in routable], sentences)
            for i, route, score in zip(routable, routes.tolist(), scores.tolist()):
                states[i].route, states[i].score = int(route), float(score)
                if route < 0:
                    states[i].mean_stats = None
        for i in deciders:
            state = states[i]
            if state.route is not None and state.route >= 0:
                state.context, state.last_input = memory.reading(state.route, state.mean_stats,
                                                                   chat_turn=state.span_end < state.prompt_len)
                self.routed += 1
                self.hits[memory.route_label(state.route)] += 1
            else:
                self.unrouted += 1

    def _add_last_sentences(self, spans: list[tuple[int, tuple[int, int]]], rows: torch.Tensor, seg: torch.Tensor,
                            stats: torch.Tensor) -> None:
        """Add this step's span statistics at positions from each request's `sentence_start` on."""
        plan, states = self.plan, [state for state, _, _ in self._tracked]
        with_sentence = [i for i, _ in spans if states[i].sentence_start is not None]
        if not with_sentence:  # WISE, or spans of one sentence: nothing to add
            return
        firsts = torch.full((len(states),), int(plan.starts[-1]), dtype=torch.long)  # flat row where it starts
        for i in with_sentence:
            firsts[i] = int(plan.starts[i]) + states[i].sentence_start - int(plan.first_pos[i])
        inside = rows >= firsts[seg]
        if not inside.any():
            return
        device = stats.device
        sums = stats.new_zeros(len(states), stats.shape[1]).index_add_(0, seg[inside].to(device), stats[inside.to(device)])
        counts = torch.bincount(seg[inside], minlength=len(states)).tolist()
        for i in with_sentence:
            state = states[i]
            if counts[i]:
                state.sentence_sum = sums[i].clone() if state.sentence_sum is None else state.sentence_sum + sums[i]
                state.sentence_count += counts[i]

    def _step_inputs(self) -> list[tuple[EditMemory, "TokenInputs"]]:
        """Per memory in the batch: its routed answer-span tokens as `TokenInputs`. Rebuilt only when
        the spans change (steady decoding keeps the same flat rows and routes from step to step)."""
        n = int(self.plan.starts[-1])
        spans = []
        for memory, members in self._members:
            span = Spans()
            for i in members:
                state = self._tracked[i][0]
                if state.route is None or state.route < 0 or not state.settled:
                    continue
                s, e = int(self.plan.starts[i]), int(self.plan.starts[i + 1])
                last = s + state.prompt_len - 1 - int(self.plan.first_pos[i])  # flat row of the last prompt token
                first = s if acts_on_all(memory) else max(s, last)
                if first < e:
                    span.add(first, e, state.route, state.context, state.last_input if s <= last < e else None, last)
            if span.firsts:
                spans.append((memory, span))
        key = (n, tuple((id(m), span.key()) for m, span in spans))
        if key != self._inputs_cache[0]:
            while len(self._buffers) < len(spans):
                self._buffers.append(TokenBuffers(self.max_tokens, self.device))
            inputs = [(memory, TokenInputs.build(memory, span, n, self.device, self._buffers[j] if self.dense else None))
                      for j, (memory, span) in enumerate(spans)]
            self._inputs_cache = (key, spans, inputs)
        return self._inputs_cache[2]


@dataclass
class Spans:
    """One memory's routed requests in a step: flat rows [firsts[j], ends[j]) routed to routes[j],
    reading contexts[j] (None: the memory's neutral one) and, at flat row lasts[j], last_inputs[j]
    instead of that row's own input (None: its own; `EditMemory.reading`)."""

    firsts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    routes: list[int] = field(default_factory=list)
    contexts: list[torch.Tensor | None] = field(default_factory=list)
    last_inputs: list[torch.Tensor | None] = field(default_factory=list)
    lasts: list[int] = field(default_factory=list)

    def add(self, first: int, end: int, route: int, context, last_input, last: int) -> None:
        for name, value in zip(("firsts", "ends", "routes", "contexts", "last_inputs", "lasts"),
                               (first, end, route, context, last_input, last)):
            getattr(self, name).append(value)

    def key(self) -> tuple:
        """Equal for two steps with the same rows, routes and reading objects (so their inputs can be reused)."""
        return (tuple(self.firsts), tuple(self.ends), tuple(self.routes), tuple(map(id, self.contexts)),
                tuple(map(id, self.last_inputs)), tuple(self.lasts))


class TokenBuffers:
    """Persistent per-token inputs of the dense path, written in place (a captured graph keeps reading
    the same storage, as vLLM's LoRA index buffers do): each row's route (-1: none, also for every
    row past the step's tokens, i.e. a graph's padding), the row of `contexts` it reads, whether it
    reads the row of `last_inputs` of that slot instead of its own input, and the routed requests'
    contexts and last-prompt-token inputs. Sized for `max_tokens` rows up front; grows only past that."""

    def __init__(self, max_tokens: int, device: torch.device):
        self.routes = torch.full((max_tokens,), NO_ROUTE, dtype=torch.long, device=device)
        self.slots = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.swaps = torch.zeros(max_tokens, dtype=torch.bool, device=device)
        self.contexts = torch.zeros(0, 0, device=device)
        self.last_inputs = torch.zeros(0, 0, device=device)

    def fill(self, rows: np.ndarray, routes: np.ndarray, slots: np.ndarray, swaps: np.ndarray, contexts: torch.Tensor,
             last_inputs: torch.Tensor, n: int) -> None:
        size, device = self.routes.shape[0], self.routes.device
        if size < n:
            size = max(n, 2 * size)
            self.routes = torch.empty(size, dtype=torch.long, device=device)
            self.slots = torch.zeros(size, dtype=torch.long, device=device)
            self.swaps = torch.zeros(size, dtype=torch.bool, device=device)
        self.contexts = self._fit(self.contexts, contexts)
        self.last_inputs = self._fit(self.last_inputs, last_inputs)
        for buffer, values, fill in ((self.routes, routes, NO_ROUTE), (self.slots, slots, 0), (self.swaps, swaps, False)):
            host = np.full(size, fill, dtype=values.dtype)
            host[rows] = values
            buffer.copy_(torch.from_numpy(host), non_blocking=True)
        self.contexts[: contexts.shape[0]].copy_(contexts)
        self.last_inputs[: last_inputs.shape[0]].copy_(last_inputs)

    @staticmethod
    def _fit(buffer: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`buffer`, or a larger one when `values` does not fit (grown by doubling, so rarely)."""
        if buffer.shape[0] >= values.shape[0] and buffer.shape[1:] == values.shape[1:]:
            return buffer
        return torch.zeros(max(values.shape[0], 2 * buffer.shape[0]), *values.shape[1:], device=buffer.device)

    def rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routes, slots and swaps of the first `n` rows (rows past the buffer are unrouted padding)."""
        if n <= self.routes.shape[0]:
            return self.routes[:n], self.slots[:n], self.swaps[:n]
        pad = n - self.routes.shape[0]
        return (torch.cat([self.routes, self.routes.new_full((pad,), NO_ROUTE)]),
                torch.cat([self.slots, self.slots.new_zeros(pad)]), torch.cat([self.swaps, self.swaps.new_zeros(pad)]))


@dataclass
class TokenInputs:
    """What one memory's delta reads in one step. Compact (`rows` set): the routed rows, their routes
    and contexts, gathered and scattered by host-built indices, and the last prompt tokens whose input
    is replaced (`swap_rows`, positions in `rows`, with `swap_inputs`). Dense (`buffers` set): every
    row of the batch from persistent per-token buffers (-1: unrouted, which the memory's delta maps to
    exactly zero): no host work, no data-dependent shapes."""

    routes: torch.Tensor | None = None
    contexts: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    swap_rows: torch.Tensor | None = None
    swap_inputs: torch.Tensor | None = None
    buffers: TokenBuffers | None = None

    @classmethod
    def build(cls, memory: EditMemory, spans: Spans, n: int, device: torch.device, buffers: TokenBuffers | None):
        """From `spans`. A request whose context is unknown (a forced route after a prefix-cache hit)
        reads the memory's neutral context; every other row its own, whatever its neighbours in the batch."""
        lengths = np.subtract(spans.ends, spans.firsts)
        span_of = np.repeat(np.arange(len(spans.firsts)), lengths)
        rows = (np.arange(len(span_of)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
                + np.repeat(spans.firsts, lengths))
        neutral = memory.neutral_context() if any(c is None for c in spans.contexts) else None
        contexts = torch.stack([neutral if c is None else c for c in spans.contexts])
        token_routes = np.asarray(spans.routes, dtype=np.int64)[span_of]
        swapped = [j for j, x in enumerate(spans.last_inputs) if x is not None]
        swaps = np.isin(rows, [spans.lasts[j] for j in swapped])
        start, end = memory.feature_range or (0, memory.intermediate_size)  # `a`'s features on this rank
        dense_swaps = buffers is not None and memory.reads_stored_inputs  # `add_to` reads the buffer
        last_inputs = torch.zeros(len(spans.firsts), end - start if dense_swaps or swapped else 0)
        for j in swapped:
            last_inputs[j] = spans.last_inputs[j]
        if buffers is not None:
            buffers.fill(rows, token_routes, span_of, swaps, contexts.to(device), last_inputs.to(device), n)
            return cls(buffers=buffers)
        if len(span_of) != len(spans.contexts):
            contexts = contexts[torch.from_numpy(span_of)]
        swap_rows = np.flatnonzero(swaps)
        return cls(torch.from_numpy(token_routes).to(device), contexts.to(device), rows=torch.from_numpy(rows).to(device),
                   swap_rows=torch.from_numpy(swap_rows).to(device) if len(swap_rows) else None,
                   swap_inputs=last_inputs[torch.from_numpy(span_of[swap_rows])].to(device) if len(swap_rows) else None)

    def add_to(self, memory: EditMemory, out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.buffers is not None:
            routes, slots, swaps = self.buffers.rows(a.shape[0])
            if memory.reads_stored_inputs:  # fixed shapes: every row chooses, none is picked on the host
                a = torch.where(swaps[:, None], self.buffers.last_inputs[slots].to(a.dtype), a)
            return out + memory.delta(a, routes, self.buffers.contexts[slots], fixed_shapes=True).to(out.dtype)
        x = a[self.rows]
        if self.swap_rows is not None:
            x = x.index_copy(0, self.swap_rows, self.swap_inputs.to(x.dtype))
        return out.index_add(0, self.rows, memory.delta(x, self.routes, self.contexts).to(out.dtype))


def acts_on_all(memory: EditMemory) -> bool:
    return getattr(memory.config, "act_on", "answer") == "all"
