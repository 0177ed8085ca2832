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
from collections import OrderedDict
from dataclasses import dataclass
from typing import Container, Sequence

import numpy as np
import torch

from memserve.chat import ChatFormat
from memserve.methods import NO_ROUTE, EditMemory

logger = logging.getLogger("vllm.memserve")  # under "vllm": shown by vLLM's log handler

# Extra per-request argument (SamplingParams.extra_args) giving the number of leading prompt tokens
# that form the routing prompt; the rest of the vLLM prompt is then treated as answer span
# (teacher forcing: prompt + target submitted as one prompt).
PROMPT_LEN_ARG = "memserve_prompt_len"
# Extra per-request argument forcing the route: -1 = serve the base model (no edit), k = use slot k.
ROUTE_ARG = "memserve_route"
NOT_FORCED = -2


@dataclass
class BatchPlan:
    """The requests of one forward, in flat-batch order."""

    req_ids: Sequence[str]
    starts: np.ndarray  # [R + 1] token offsets (query_start_loc)
    first_pos: np.ndarray  # [R] sequence position of each request's first scheduled token
    prompt_lens: np.ndarray  # [R] routing prompt length of each request
    forced_routes: np.ndarray | None = None  # [R] route fixed by the caller, NOT_FORCED otherwise
    # [R, 2] each request's routing span [start, end) within its prompt (`ChatFormat.routing_span`);
    # read when a request is first seen; None: the whole prompt.
    route_spans: np.ndarray | None = None


@dataclass
class RequestRoute:
    stats_sum: torch.Tensor | None = None
    count: int = 0
    next_pos: int = 0
    route: int | None = None  # None until the last prompt token was processed
    score: float = 0.0
    complete: bool = True  # False if some prompt positions were never computed (cannot route exactly)
    prompt_len: int = 0
    span_end: int = 0  # routing statistics come from positions [span start, span_end)
    end_pos: int = 0  # one past the highest position processed so far
    mean_stats: torch.Tensor | None = None  # the prompt mean routed on: the memory's `context`
    memory: EditMemory | None = None  # the memory current when the request was first seen; serves all of it
    version: int | None = None  # store version of that memory


@dataclass
class RouteInfo:
    route: int
    label: str
    score: float
    version: int | None = None  # store version of the memory that served the request

    @classmethod
    def of(cls, state: RequestRoute) -> "RouteInfo":
        return cls(state.route, state.memory.route_label(state.route), state.score, state.version)

    def to_dict(self) -> dict:
        return {"route": self.route, "edit": self.label, "score": self.score, "version": self.version}


def external_id(req_id: str) -> str:
    """vLLM v1 appends '-' + 8 random characters to the caller's request id."""
    head, sep, tail = req_id.rpartition("-")
    return head if sep and len(tail) == 8 else req_id


class MemoryRuntime:
    """Routing state of one memory attached to one model instance."""

    def __init__(self, memory: EditMemory, chat: ChatFormat | None = None, max_recent: int = 65536,
                 version: int | None = None):
        self.memory = memory  # serves requests first seen from now on (see `swap`)
        self.version = version
        self.chat = chat
        self.states: dict[str, RequestRoute] = {}
        self.recent: OrderedDict[str, RouteInfo] = OrderedDict()
        self.max_recent = max_recent
        self.plan: BatchPlan | None = None
        self._warned_gap = False
        self.steps = 0  # forwards that went through `apply` with a plan (for tests / diagnostics)
        self.recomputes = 0  # chunks that re-ran already processed positions (preemption)
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
            self._remember(req_id, state)

    def prune(self, live: Container[str]) -> None:
        for req_id in [r for r in self.states if r not in live]:
            self.free(req_id)

    def _remember(self, req_id: str, state: RequestRoute) -> None:
        info = RouteInfo.of(state)
        for key in {req_id, external_id(req_id)}:
            self.recent[key] = info
            self.recent.move_to_end(key)
        while len(self.recent) > self.max_recent:
            self.recent.popitem(last=False)

    def route_info(self, req_id: str) -> RouteInfo | None:
        """Route of a live or recently finished request (internal or caller-supplied id)."""
        for rid, state in self.states.items():
            if state.route is not None and (rid == req_id or external_id(rid) == req_id):
                return RouteInfo.of(state)
        return self.recent.get(req_id)

    def memory_slots(self, memory: EditMemory | None = None) -> int:
        """Number of routable slots (MEMOIR: edits; WISE: memories incl. the side memory)."""
        memory = memory or self.memory
        masks = getattr(memory, "masks", None)
        if masks is not None:
            return int(masks.shape[0])
        candidates = getattr(memory, "_candidates", None)
        return int(candidates()[1].numel()) if candidates else memory.num_edits

    # --- the forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """`out` = base down_proj output [N, H] for the flat batch whose inputs are `a` [N, I]."""
        plan = self.plan
        if plan is None:
            return out
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
        forced = NOT_FORCED if plan.forced_routes is None else int(plan.forced_routes[i])
        if forced != NOT_FORCED:
            if not NO_ROUTE <= forced < self.memory_slots():
                raise ValueError(f"memserve: forced route {forced} is not a memory slot")
            state.route, state.score = forced, float("nan")
        elif not self.memory.num_edits:
            state.route = NO_ROUTE  # nothing to route to, now or later in this request's life
        return state

    def _track(self, plan: BatchPlan, i: int) -> tuple[RequestRoute, tuple[int, int] | None, bool]:
        """Request i's state (created when first seen) after this chunk's bookkeeping, the flat rows
        [lo, hi) of its routing-span tokens not yet counted, and whether its route is decided now."""
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
        if state.route is not None:
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
        """Add this step's span statistics of `members` (requests served by `memory`) and route those
        whose prompt ends in this step."""
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
        routable = [i for i in deciders if states[i].complete and states[i].count > 0]
        for i in deciders:
            if i not in routable:
                states[i].route, states[i].score = NO_ROUTE, 0.0
                if not self._warned_gap:
                    self._warned_gap = True
                    logger.warning(
                        "memserve: request %s skipped prompt tokens (prefix cache hit?); it is served "
                        "without edits. Disable prefix caching when serving edits.", plan.req_ids[i])
        if routable:
            means = torch.stack([states[i].stats_sum / states[i].count for i in routable])
            routes, scores = memory.route(means)
            for i, route, score, mean in zip(routable, routes.tolist(), scores.tolist(), means):
                states[i].route, states[i].score = int(route), float(score)
                states[i].stats_sum = None  # no longer needed
                states[i].mean_stats = mean if route >= 0 else None

    def _add_delta(self, memory: EditMemory, members: list[int], states: list[RequestRoute], plan: BatchPlan,
                   a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` plus `memory`'s contribution on the answer-span tokens of its routed `members`.
        Runs every step: only the routed rows go through `memory.delta` (one call for the batch)."""
        firsts, ends, routes, means = [], [], [], []
        for i in members:
            state = states[i]
            if state.route is None or state.route < 0:
                continue
            s, e = int(plan.starts[i]), int(plan.starts[i + 1])
            first = s if acts_on_all(memory) else s + max(0, state.prompt_len - 1 - int(plan.first_pos[i]))
            if first < e:
                firsts.append(first), ends.append(e), routes.append(state.route), means.append(state.mean_stats)
        if not firsts:
            return out
        key = (id(memory), tuple(firsts), tuple(ends), tuple(routes), tuple(map(id, means)))
        if key != self._delta_cache[0]:  # else: the same spans as last step (steady decoding): reuse
            self._delta_cache = (key, (memory, means), delta_inputs(firsts, ends, routes, means))
        rows, token_routes, context = self._delta_cache[2]
        return out.index_add(0, rows, memory.delta(a[rows], token_routes, context).to(out.dtype))


def delta_inputs(firsts: list[int], ends: list[int], routes: list[int], means: list[torch.Tensor | None]):
    """(flat rows of the spans [firsts[j], ends[j]), their routes, their prompt means or None)."""
    lengths = np.subtract(ends, firsts)
    span_of = np.repeat(np.arange(len(firsts)), lengths)
    rows = np.arange(len(span_of)) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(firsts, lengths)
    token_routes = torch.from_numpy(np.asarray(routes, dtype=np.int64)[span_of])
    context = None
    if all(mean is not None for mean in means):  # None only for forced routes
        context = torch.stack(means)
        if len(span_of) != len(means):
            context = context[torch.from_numpy(span_of)]
    return torch.from_numpy(rows), token_routes, context


def acts_on_all(memory: EditMemory) -> bool:
    return getattr(memory.config, "act_on", "answer") == "all"
