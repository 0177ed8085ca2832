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
from dataclasses import dataclass
from typing import Container, Sequence

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
    mean_stats: torch.Tensor | None = None  # the prompt mean routed on: the memory's `context`
    memory: EditMemory | None = None  # the memory current when the request was first seen; serves all of it
    version: int | None = None  # store version of that memory
    forced: bool = False  # the route came from the request's options, not from its prompt
    report_tag: str | None = None  # `options.REPORT_TAG_ARG` of the HTTP request it belongs to
    explain: int | None = None  # `options.EXPLAIN_ARG`: keep `explanation` with this many nearest slots
    explanation: dict | None = None  # `methods.route_explanation` of the prompt mean, when asked
    mentions: frozenset[int] | None = None  # the edits whose subject its routing span names


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
                 version: int | None = None):
        self.memory = memory  # serves requests first seen from now on (see `swap`)
        self.version = version
        self.chat = chat
        self.states: dict[str, RequestRoute] = {}
        self.recent = RouteLog(max_recent)
        self.plan: BatchPlan | None = None
        self._warned_gap = False
        self.steps = 0  # forwards that went through `apply` with a plan (for tests / diagnostics)
        self.recomputes = 0  # chunks that re-ran already processed positions (preemption)
        self.refused_options = 0  # requests served without edits because their options were invalid
        # Metrics (`/metrics`): routing decisions, hits per route label, time spent in `apply`.
        self.routed = 0
        self.unrouted = 0
        self.hits: Counter[str] = Counter()
        self.apply_seconds = 0.0
        # act_on="all" (memory on every token, as in the papers' code): prompt chunks processed before
        # the route was known got the base output; exact only if each prompt is prefilled in one chunk
        # (serve with chunked prefill off). Counted here and warned about once.
        self.inexact = 0
        # `_add_delta`'s last (key, objects whose ids the key holds, kept alive so ids stay unique, inputs)
        self._delta_cache: tuple = (None, None, None)

    def swap(self, memory: EditMemory, version: int | None = None) -> None:
        """Serve `memory` to requests first seen from now on; live requests keep theirs (module doc)."""
        self.memory, self.version = memory, version

    def pinned_memories(self) -> int:
        """Memories other than the current one still serving live requests (after a swap)."""
        return len({id(s.memory) for s in self.states.values() if s.memory is not self.memory})

    def routing_span(self, prompt: Sequence[int] | None, prompt_len: int) -> tuple[int, int]:
        """Where in its first `prompt_len` tokens a request is routed from (see `memserve.chat`)."""
        if self.chat is None or prompt is None:
            return 0, prompt_len
        return self.chat.routing_span(list(prompt[:prompt_len]))

    # --- lifecycle, driven by the model runner ----------------------------------------------------
    def begin_step(self, plan: BatchPlan | None) -> None:
        self.plan = plan

    def end_step(self) -> None:
        self.plan = None

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
        """`out` = base down_proj output [N, H] for the flat batch whose inputs are `a` [N, I]."""
        plan = self.plan
        if plan is None:
            return out
        started = time.perf_counter()
        try:
            return self._apply(plan, out, a)
        finally:
            self.apply_seconds += time.perf_counter() - started

    def _apply(self, plan: BatchPlan, out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        tracked = [self._track(plan, i) for i in range(len(plan.req_ids))]
        states = [state for state, _, _ in tracked]
        by_memory: dict[int, list[int]] = {}
        for i, state in enumerate(states):
            if state.memory.num_edits:
                by_memory.setdefault(id(state.memory), []).append(i)
        for members in by_memory.values():
            memory = states[members[0]].memory
            self._route(memory, members, tracked, plan, a)
            out = self._add_delta(memory, members, states, plan, a, out)
        return out

    def _new_state(self, plan: BatchPlan, i: int) -> RequestRoute:
        plen = int(plan.prompt_lens[i])
        span = (0, plen) if plan.route_spans is None else (int(plan.route_spans[i][0]), int(plan.route_spans[i][1]))
        state = RequestRoute(next_pos=span[0], prompt_len=plen, span_end=min(span[1], plen), memory=self.memory,
                             version=self.version)
        tokens = None if plan.route_tokens is None else plan.route_tokens[i]
        state.mentions = None if tokens is None else self.memory.mentioned(tokens)
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

    def _route(self, memory: EditMemory, members: list[int], tracked: list, plan: BatchPlan, a: torch.Tensor) -> None:
        """Add this step's span statistics of `members` (requests served by `memory`) and settle those
        whose prompt ends in this step: route them (unless forced) and keep their prompt mean."""
        states = [state for state, _, _ in tracked]
        spans = [(i, tracked[i][1]) for i in members if tracked[i][1] is not None]
        if spans:
            rows = torch.cat([torch.arange(lo, hi) for _, (lo, hi) in spans])
            seg = torch.cat([torch.full((hi - lo,), i, dtype=torch.long) for i, (lo, hi) in spans])
            stats = memory.token_stats(a[rows])
            sums = stats.new_zeros(len(states), stats.shape[1]).index_add_(0, seg, stats)
            counts = torch.bincount(seg, minlength=len(states)).tolist()
            for i, _ in spans:
                state = states[i]
                state.stats_sum = sums[i].clone() if state.stats_sum is None else state.stats_sum + sums[i]
                state.count += counts[i]

        deciders = [i for i in members if tracked[i][2]]
        known = [i for i in deciders if states[i].complete and states[i].count > 0]
        for i in deciders:
            state = states[i]
            state.settled = True
            if i in known:
                state.mean_stats = state.stats_sum / state.count
                if state.explain:
                    state.explanation = route_explanation(memory, state.mean_stats, state.explain, state.mentions)
            state.stats_sum = None  # no longer needed
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
            routes, scores = memory.route(torch.stack([states[i].mean_stats for i in routable]),
                                          [states[i].mentions for i in routable])
            for i, route, score in zip(routable, routes.tolist(), scores.tolist()):
                states[i].route, states[i].score = int(route), float(score)
                if route < 0:
                    states[i].mean_stats = None
        for i in deciders:
            route = states[i].route
            if route is not None and route >= 0:
                self.routed += 1
                self.hits[memory.route_label(route)] += 1
            else:
                self.unrouted += 1

    def _add_delta(self, memory: EditMemory, members: list[int], states: list[RequestRoute], plan: BatchPlan,
                   a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` plus `memory`'s contribution on the answer-span tokens of its routed `members`.
        Runs every step: only the routed rows go through `memory.delta` (one call for the batch)."""
        firsts, ends, routes, means = [], [], [], []
        for i in members:
            state = states[i]
            if state.route is None or state.route < 0 or not state.settled:
                continue
            s, e = int(plan.starts[i]), int(plan.starts[i + 1])
            first = s if acts_on_all(memory) else s + max(0, state.prompt_len - 1 - int(plan.first_pos[i]))
            if first < e:
                firsts.append(first), ends.append(e), routes.append(state.route), means.append(state.mean_stats)
        if not firsts:
            return out
        key = (id(memory), tuple(firsts), tuple(ends), tuple(routes), tuple(map(id, means)))
        if key != self._delta_cache[0]:  # else: the same spans as last step (steady decoding): reuse
            self._delta_cache = (key, (memory, means), delta_inputs(memory, firsts, ends, routes, means))
        rows, token_routes, context = self._delta_cache[2]
        return out.index_add(0, rows, memory.delta(a[rows], token_routes, context).to(out.dtype))


def delta_inputs(memory: EditMemory, firsts: list[int], ends: list[int], routes: list[int],
                 means: list[torch.Tensor | None]):
    """(flat rows of the spans [firsts[j], ends[j]), their routes, their prompt means). A request
    whose prompt statistics are unknown (a forced route after a prefix-cache hit) gets the memory's
    neutral context; every other row keeps its own, whatever its neighbours in the batch."""
    lengths = np.subtract(ends, firsts)
    span_of = np.repeat(np.arange(len(firsts)), lengths)
    rows = np.arange(len(span_of)) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(firsts, lengths)
    token_routes = torch.from_numpy(np.asarray(routes, dtype=np.int64)[span_of])
    neutral = None
    if any(mean is None for mean in means):
        neutral = memory.neutral_context()
    context = torch.stack([neutral if mean is None else mean for mean in means])
    if len(span_of) != len(means):
        context = context[torch.from_numpy(span_of)]
    return torch.from_numpy(rows), token_routes, context


def acts_on_all(memory: EditMemory) -> bool:
    return getattr(memory.config, "act_on", "answer") == "all"
