"""WISE (arXiv 2405.14768): side copies of the FFN value matrix W, trained per edit under a random
gradient mask, in a pool of at most `pool` memories.

Each edit trains a side memory W' (from W, gradients confined to a random mask, a target loss plus a
routing hinge loss with margins alpha, beta, gamma). What happens next is `consolidate`:

- "lstsq" (default): W' is a teacher. Its outputs on the edit's own activations (every answer-span
  token it acted on, every in-scope prompt mean; zero on out-of-scope prompt means) are kept as the
  edit's samples, and memory `e % pool` is the ridge least-squares fit of the samples of all its
  edits (`ridge_fit`), refit whenever one joins. The memories are derived data: the store keeps the
  samples (~0.5 MB per edit on the default model), never a memory per edit. A query goes to the memory
  of the edit whose key (the edit's decentred prompt mean, bare and as a chat turn) is most similar
  to its own prompt mean, if the cosine reaches `key_tau` and the query names the edit's subject
  (`subject_anchor`, as MEMOIR); otherwise the base output is used unchanged.
- "ties" (the paper; stores written before the pool): every `save_freq` edits W' becomes a knowledge
  shard and restarts from W; every `merge_freq` edits the pending shards are TIES-merged into one
  memory (kept beside earlier ones with `retrieve`). A query's score for a memory is its gain
  `||(W' - W) x|| / ||x||` on the prompt's decentred mean x (`score="prompt"`) or the paper's mean
  token norm (`score="tokens"`); the memory furthest above its threshold eps wins (WISE-Retrieve).

This file is the single home of WISE's routing rule (`WiseMemory.route`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from memserve.subjects import AnchorIndex

from .base import NO_ROUTE, EditExamples, EditMemory, EditSession, MethodConfig, mean_prompt_stats


@dataclass
class WiseConfig(MethodConfig):
    # Layer 24 of 30: there a question's decentred prompt mean is closest to its rephrase's relative to
    # unrelated prompts (ZsRE dev: rephrase cosine median .86, unrelated .08, rephrase top-1 .99; .89
    # at 22), as for MEMOIR (benchmarks/routing_layers.py).
    layer: int = 24
    lr: float = 0.02
    steps: int = 60
    mask_ratio: float = 0.2  # rho: share of W' entries one shard may change
    # eps = act_ratio * (lowest in-scope key score seen by the memory). ZsRE dev T=148 (scores of the
    # final memories): locality probes reach no memory .973 at .6, 1.0 at .64-.70; rephrases routed
    # .980 at .6, .946 at .65, .919 at .7.
    act_ratio: float = 0.65
    alpha: float = 5.0  # out-of-scope scores pushed below alpha
    beta: float = 20.0  # in-scope scores pushed above beta
    gamma: float = 10.0  # in-scope must beat out-of-scope by gamma
    clamp: float = 1.0  # W' stays within W ± clamp, elementwise
    # One edit per memory (WISE-Retrieve at its finest grain). Edits sharing a side memory overwrite
    # each other here: all questions end alike, so a later edit remaps an earlier one's answer span
    # (ZsRE dev, 10 edits in one memory: Rel .77 with routing 1.0; 5 per memory: Rel .78).
    save_freq: int = 1
    merge_freq: int = 1
    merge_density: float = 0.53  # TIES: share of each task vector kept
    retrieve: bool = True
    # What the gate reads. "tokens" (the paper): mean over prompt tokens of ||(W'-W) a_t||. "prompt":
    # ||(W'-W) x|| with x the prompt's mean activation. Token norms are dominated by what every
    # prompt shares, so with "tokens" locality probes outscored the edits' own prompts.
    score: str = "prompt"
    # Score `a - background` (mean over unrelated prompts, set by `calibrate`) instead of `a`: the
    # common component every prompt shares would otherwise dominate every score.
    decentre: bool = True
    # Divide the "prompt" score by ||x||: the memory's gain on the prompt rather than its output size,
    # so the margins alpha/beta/gamma mean the same for every edit and memories compare fairly.
    normalise: bool = True
    # Out-of-scope rows per edit for the hinge loss (background prompts, see `editor`).
    negatives: int = 24
    # The threshold comes from the lowest score of all the edit's routing keys (bare prompt and chat
    # turn, `EditExamples.key_rows`), not the bare prompt alone, so chat requests reach the memory.
    key_eps: bool = True
    # Among eligible memories pick the highest score / eps (margin over the memory's own threshold)
    # rather than the highest raw score (the paper). ZsRE dev T=148: edit prompts reaching their own
    # memory .993 -> 1.0, rephrases .973 -> .980.
    margin_pick: bool = True
    # How edits become memories. "lstsq": every edit trains its own side memory (a teacher), whose
    # outputs on the edit's own activations are kept (`edit_samples`); memory `e % pool` is the
    # ridge least-squares fit of the samples of all its edits, refit when one joins. Edits sharing a
    # memory are fitted jointly instead of overwriting each other: 16 ZsRE edits trained in sequence
    # into one side memory keep Rel .5 on the older ones (1.0 on the last four). "ties": the paper's
    # knowledge shards (`save_freq`) TIES-merged every `merge_freq` edits.
    consolidate: str = "lstsq"
    pool: int = 16  # "lstsq": memories at most, whatever the number of edits
    # "lstsq": ridge strength, relative to the mean eigenvalue of the fitted inputs' Gram matrix.
    ridge: float = 1e-3
    # "lstsq" routes by the edits' keys, not by each memory's gain: a memory fitted to many edits has
    # a high gain almost everywhere (ZsRE, 64 edits in one memory: every locality probe passed its
    # gain threshold). A query goes to the memory of the edit whose key (a decentred prompt mean, bare
    # and as a chat turn) is most cosine-similar to its own, if that reaches `key_tau` and, with
    # `subject_anchor`, if the query names the edit's subject (as MEMOIR, `memserve.subjects`).
    # ZsRE train rows 0-299 as keys (in-sample): rephrases reach their own key at >= .6: .947 (chat
    # .98), unrelated locality probes never; same-template unedited questions reach some key .162
    # (chat .446) before anchors gate them.
    key_tau: float = 0.6
    subject_anchor: bool = True
    # The task vector multiplies `a - background` instead of `a` (the common component every
    # activation shares). It did not stop edits trained in sequence into one memory from overwriting
    # each other (ZsRE, 32 in one memory: Rel .57 without, .55 with); the "lstsq" pool fits them jointly.
    decentre_delta: bool = True
    predated: ClassVar[dict[str, Any]] = {
        "score": "tokens", "decentre": False, "negatives": 1, "normalise": False, "key_eps": False, "margin_pick": False,
        "decentre_delta": False, "consolidate": "ties",
    }


def ties_merge(task_vectors: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-merging of [S, ...] task vectors: trim to the top `density` by magnitude, elect a sign per
    entry by summed value, average the entries that agree with it (equal weights)."""
    flat = task_vectors.reshape(task_vectors.shape[0], -1)
    keep = max(1, int(round(flat.shape[1] * density)))
    threshold = flat.abs().kthvalue(flat.shape[1] - keep + 1, dim=1, keepdim=True).values
    trimmed = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
    return merged.reshape(task_vectors.shape[1:])


def ridge_fit(inputs: torch.Tensor, outputs: torch.Tensor, ridge: float) -> torch.Tensor:
    """The task vector [H, I] minimising ||inputs @ T^T - outputs||^2 + lam ||T||^2 over [N, I] inputs
    and [N, H] outputs, lam = `ridge` x the mean eigenvalue of the inputs' Gram matrix. Directions no
    input spans map to (nearly) zero, so a memory fitted to its edits stays quiet elsewhere."""
    x, y = inputs.double(), outputs.double()
    gram = x.T @ x
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    gram.diagonal().add_(lam)
    return torch.linalg.solve(gram, x.T @ y).T.float()


class WiseMemory(EditMemory):
    method = "wise"
    config_class = WiseConfig
    routes_are_edits = False

    def __init__(self, config: WiseConfig, base_weight: torch.Tensor):
        super().__init__(config, base_weight)
        if config.consolidate not in ("lstsq", "ties"):
            raise ValueError(f"consolidate must be 'lstsq' or 'ties', got {config.consolidate!r}")
        if config.consolidate == "lstsq" and (config.score != "prompt" or config.pool < 1):
            raise ValueError("consolidate='lstsq' needs score='prompt' and pool >= 1")
        hidden, inter = self.hidden_size, self.intermediate_size
        self.register_buffer("base_weight", base_weight.detach().float().clone(), persistent=False)
        self.register_buffer("side", self.base_weight.clone())
        self.register_buffer("side_min_score", torch.tensor(float("inf")))
        self.register_buffer("background", torch.zeros(inter))
        # Finished memories (pending shards and merged memories) with their thresholds.
        self.register_buffer("memories", torch.zeros(0, hidden, inter))
        self.register_buffer("memory_eps", torch.zeros(0))
        self.register_buffer("memory_is_shard", torch.zeros(0, dtype=torch.bool))
        # [edits in total, edits in the current side memory, shards started so far]
        self.register_buffer("counters", torch.zeros(3, dtype=torch.long))
        # "lstsq": per edit, rows [is key, memory input (I), teacher output (H)] (`WiseSession.samples`)
        self.edit_samples: list[torch.Tensor] = []
        self.anchors = AnchorIndex()  # "lstsq": each anchored edit's subject token ids
        self._keys: tuple[torch.Tensor, torch.Tensor] | None = None  # `edit_keys()`, until an edit joins
        self._routable: tuple[torch.Tensor, torch.Tensor] | None = None  # `_candidates()`, until the state changes
        self._slots = 0  # `memory-<i>` tensors persisted so far (see `state_tensors`)

    # --- bookkeeping ----------------------------------------------------------------------
    @property
    def num_edits(self) -> int:
        return int(self.counters[0])

    @property
    def side_edits(self) -> int:
        return int(self.counters[1])

    def _candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Memories a query can be routed to, as task vectors [M, H, I] and thresholds [M]. Cached:
        serving calls this on every forward, and building it copies every memory."""
        if self._routable is None:
            weights, eps = self.memories, self.memory_eps
            if self.side_edits:
                weights = torch.cat([weights, self.side[None]])
                eps = torch.cat([eps, (self.side_min_score * self.config.act_ratio)[None]])
            self._routable = (weights - self.base_weight, eps)
        return self._routable

    def gradient_mask(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + int(self.counters[2]))
        return torch.rand(self.side.shape, generator=generator) < self.config.mask_ratio

    # --- routing and inference --------------------------------------------------------------
    def gate_input(self, a: torch.Tensor) -> torch.Tensor:
        """What the score's norm is taken of (before the memory's task vector): `a`, or `a - background`."""
        return a.float() - self.placed("background", a.device) if self.config.decentre else a.float()

    def delta_input(self, a: torch.Tensor) -> torch.Tensor:
        """What a task vector multiplies: `a`, or `a - background` (`decentre_delta`); on a
        tensor-parallel rank `a` holds the rank's features only, and so does the background."""
        return a.float() - self.rank_background(a.device) if self.config.decentre_delta else a.float()

    def token_stats(self, a: torch.Tensor) -> torch.Tensor:
        if self.config.score == "prompt":  # the prompt mean of `a` itself; `route` scores it
            return a.float()
        deltas = self.task_vectors(a.device, whole=True)
        if deltas.shape[0] == 0:
            return a.new_zeros(a.shape[0], 0, dtype=torch.float32)
        return torch.einsum("ni,mhi->nmh", self.gate_input(a), deltas).norm(dim=-1)

    def gate_scores(self, mean_stats: torch.Tensor, deltas: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt means of `token_stats` [B, D] -> the score of each memory [B, M] (task vectors
        `deltas` [M, H, I], by default the routable memories')."""
        if self.config.score != "prompt":
            return mean_stats
        deltas = self._candidates()[0] if deltas is None else deltas
        x = self.gate_input(mean_stats)
        scores = torch.einsum("bi,mhi->bmh", x, deltas).norm(dim=-1)
        return scores / x.norm(dim=-1, keepdim=True).clamp_min(1e-6) if self.config.normalise else scores

    def task_vectors(self, device: torch.device, whole: bool = False) -> torch.Tensor:
        """The routable memories' task vectors [M, H, I] on `device`: this tensor-parallel rank's
        columns of each (`feature_range`) unless `whole` (`served`)."""
        deltas = self._candidates()[0]
        if whole or self.feature_range is None:
            return self.served("task_vectors", device, lambda: deltas, deltas)
        start, end = self.feature_range
        return self.served("rank_task_vectors", device, lambda: deltas[:, :, start:end].contiguous(), deltas)

    @property
    def pooled(self) -> bool:
        return self.config.consolidate == "lstsq"

    def edit_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """"lstsq": every edit's routing keys, unit-norm [K, I], and the edit owning each [K]."""
        if self._keys is None:
            keys, owners = [], []
            for edit, samples in enumerate(self.edit_samples):
                rows = samples[samples[:, 0] > 0, 1 : 1 + self.intermediate_size]
                keys.append(rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-6))
                owners.append(torch.full((len(rows),), edit))
            empty = (torch.zeros(0, self.intermediate_size), torch.zeros(0, dtype=torch.long))
            self._keys = (torch.cat(keys), torch.cat(owners)) if keys else empty
        return self._keys

    def key_similarity(self, mean_stats: torch.Tensor, mentions=None) -> tuple[torch.Tensor, torch.Tensor]:
        """"lstsq": each query's cosine to every edit key [B, K], -inf where the key's edit is not
        eligible (anchored and not named), and each key's threshold [B, K] (`key_tau`; 0 for a named
        edit whose subject alone suffices)."""
        keys, owners = self.edit_keys()
        x = self.gate_input(mean_stats)
        sims = (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)) @ keys.T
        thresholds = torch.full_like(sims, self.config.key_tau)
        if self.config.subject_anchor and self.anchors.anchored:
            anchored = torch.zeros(len(self.edit_samples), dtype=torch.bool)
            anchored[sorted(self.anchors.anchored)] = True
            for row in range(len(sims)):
                named = sorted((mentions[row] if mentions else None) or ())
                allowed = ~anchored
                allowed[named] = True
                sims[row, ~allowed[owners]] = float("-inf")
                sufficient = [e for e in named if e in self.anchors.sufficient]
                thresholds[row, torch.isin(owners, torch.tensor(sufficient, dtype=torch.long))] = 0.0
        return sims, thresholds

    def route_by_keys(self, mean_stats: torch.Tensor, mentions=None) -> tuple[torch.Tensor, torch.Tensor]:
        """"lstsq": the memory of the most similar eligible key that reaches its threshold (the newest
        edit on ties, so a re-edit replaces the old answer); the best similarity as score."""
        batch = mean_stats.shape[0]
        sims, thresholds = self.key_similarity(mean_stats, mentions)
        if sims.shape[1] == 0:
            return torch.full((batch,), NO_ROUTE, dtype=torch.long), torch.zeros(batch)
        passing = torch.where(sims >= thresholds, sims, torch.full_like(sims, float("-inf")))
        best = sims.shape[1] - 1 - passing.flip(-1).argmax(-1)
        owners = self.edit_keys()[1]
        routes = torch.where(passing.amax(-1) > float("-inf"), owners[best] % self.config.pool, NO_ROUTE)
        return routes, sims.amax(-1).clamp_min(0.0)

    def route(self, mean_stats: torch.Tensor, mentions=None, last_sentence=None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pooled:
            return self.route_by_keys(mean_stats, mentions)
        _, eps = self._candidates()
        batch = mean_stats.shape[0]
        if eps.numel() == 0:
            return torch.full((batch,), NO_ROUTE, dtype=torch.long), torch.zeros(batch)
        mean_stats = self.gate_scores(mean_stats)
        eligible = mean_stats >= eps
        rank = mean_stats / eps.clamp_min(1e-12) if self.config.margin_pick else mean_stats
        _, best = torch.where(eligible, rank, torch.full_like(rank, -1.0)).max(dim=-1)
        routes = torch.where(eligible.any(-1), best, torch.full_like(best, NO_ROUTE))
        return routes, mean_stats.max(dim=-1).values

    def candidates(self, mean_stats: torch.Tensor, mentions=None) -> tuple[torch.Tensor, ...]:
        """Each memory's gate score and threshold, ranked as `route` ranks eligible ones (WISE has no
        subject anchors: every memory may be reached)."""
        _, eps = self._candidates()
        if eps.numel() == 0:
            empty = torch.zeros(0)
            return empty.long(), empty, empty, empty.bool()
        if self.pooled:  # each memory's best eligible key, against that key's threshold
            sims, thresholds = self.key_similarity(mean_stats[None], [mentions])
            slots = self.edit_keys()[1] % self.config.pool
            scores = torch.full((eps.numel(),), -1.0).scatter_reduce(0, slots, sims[0].clamp_min(-1.0), "amax")
            best = torch.full((eps.numel(),), -1, dtype=torch.long).scatter_reduce(
                0, slots, torch.where(sims[0] > float("-inf"), torch.arange(len(slots)), -1), "amax")
            eligible = best >= 0
            order = torch.tensor(sorted(range(len(scores)), key=lambda m: (not eligible[m], -float(scores[m]))), dtype=torch.long)
            threshold = torch.where(eligible, thresholds[0][best.clamp_min(0)], torch.full_like(scores, self.config.key_tau))
            return order, scores[order], threshold[order], eligible[order]
        scores = self.gate_scores(mean_stats[None])[0]
        rank = scores / eps.clamp_min(1e-12) if self.config.margin_pick else scores
        eligible = (scores >= eps).tolist()
        order = torch.tensor(sorted(range(len(eligible)), key=lambda m: (not eligible[m], -float(rank[m]))), dtype=torch.long)
        return order, scores[order], eps[order], torch.ones(len(order), dtype=torch.bool)

    def delta(self, a: torch.Tensor, routes: torch.Tensor, context: torch.Tensor | None = None,
              fixed_shapes: bool = False) -> torch.Tensor:
        """Rows grouped by route on the host: one product per route present in the step. With
        `fixed_shapes`, every memory's product over every row, masked by route: no host
        synchronisation, at the price of one product per memory (at most `pool` + 1)."""
        deltas = self.task_vectors(a.device)
        if fixed_shapes:
            x = self.delta_input(a)
            summed = x.new_zeros(a.shape[0], self.hidden_size)
            for route in range(deltas.shape[0]):
                summed += (routes == route).unsqueeze(1) * (x @ deltas[route].T)
            return summed.to(a.dtype)
        out = a.new_zeros(a.shape[0], self.hidden_size)
        for route in routes[routes >= 0].unique().tolist():
            rows = (routes == route).nonzero().squeeze(1)
            out[rows] = (self.delta_input(a[rows]) @ deltas[route].T).to(a.dtype)
        return out

    def mentioned(self, tokens, continues_name=None) -> frozenset[int] | None:  # whole names: not measured for WISE
        return self.anchors.mentioned(tokens) if self.pooled and self.config.subject_anchor else None

    def load_anchors(self, anchors) -> None:
        self.anchors = AnchorIndex.of_edits(anchors)

    def shard_features(self, start: int, end: int) -> None:
        if self.config.score != "prompt":
            raise NotImplementedError("a WISE memory scored per token (score='tokens') cannot be served with "
                                      "tensor parallelism: its routing statistics need every feature of each token")
        self.feature_range = (start, end)

    def route_label(self, route: int) -> str:
        if route < 0:
            return "none"
        return "side" if route == self.memories.shape[0] else f"memory-{route}"

    # --- training ---------------------------------------------------------------------------
    def start_edit(self, examples: EditExamples) -> EditSession:
        return WiseSession(self, examples)

    def scores(self, side: torch.Tensor, a: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Per-row gate score (`token_stats` averaged over the prompt, then `route`'s score),
        differentiable in W'."""
        if self.config.score == "prompt":
            return self.gate_scores(mean_prompt_stats(self, a, prompt_mask), (side - self.base_weight)[None])[:, 0]
        weights = prompt_mask.float()
        per_token = (self.gate_input(a) @ (side - self.base_weight).T).norm(dim=-1)  # [S, T]
        return (per_token * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def _close_side(self) -> None:
        """Turn the current side memory into a shard and start a fresh one."""
        eps = self.side_min_score * self.config.act_ratio
        self.memories = torch.cat([self.memories, self.side[None].clone()])
        self.memory_eps = torch.cat([self.memory_eps, eps[None]])
        self.memory_is_shard = torch.cat([self.memory_is_shard, torch.tensor([True])])
        self.side = self.base_weight.clone()
        self.side_min_score = torch.tensor(float("inf"))
        self.counters[1] = 0
        self.counters[2] += 1

    def _merge_shards(self) -> None:
        cfg = self.config
        if not cfg.retrieve:  # WISE-Merge: everything folds into a single memory
            self.memory_is_shard[:] = True
        shards = self.memory_is_shard
        if int(shards.sum()) == 0:
            return
        vectors = self.memories[shards] - self.base_weight
        merged = self.base_weight + (ties_merge(vectors, cfg.merge_density) if vectors.shape[0] > 1 else vectors[0])
        eps = self.memory_eps[shards].min()
        self.memories = torch.cat([self.memories[~shards], merged[None]])
        self.memory_eps = torch.cat([self.memory_eps[~shards], eps[None]])
        self.memory_is_shard = torch.cat([self.memory_is_shard[~shards], torch.tensor([False])])

    def add_edit_samples(self, samples: torch.Tensor) -> None:
        """"lstsq": keep a new edit's samples and refit the memory it joins."""
        self.edit_samples.append(samples)
        self._refit(len(self.edit_samples) - 1)

    def _refit(self, *edits: int) -> None:
        """Refit the memories holding `edits` from the samples of all their edits."""
        pool, inter = self.config.pool, self.intermediate_size
        slots = sorted({e % pool for e in edits})
        count = min(len(self.edit_samples), pool)
        if self.memories.shape[0] < count:
            grow = count - self.memories.shape[0]
            self.memories = torch.cat([self.memories, self.base_weight.expand(grow, -1, -1).clone()])
            self.memory_eps = torch.cat([self.memory_eps, torch.zeros(grow)])
            self.memory_is_shard = torch.zeros(count, dtype=torch.bool)
        self._keys = None
        for slot in slots:
            rows = torch.cat(self.edit_samples[slot::pool])
            task = ridge_fit(rows[:, 1 : 1 + inter], rows[:, 1 + inter :], self.config.ridge)
            self.memories[slot] = self.base_weight + task
            self.memory_eps[slot] = self.config.key_tau  # shown by `candidates`; `route_by_keys` decides
        self._routable = None

    def calibrate(self, background_mean: torch.Tensor, model: str | None = None,
                  input_embeddings: torch.Tensor | None = None) -> None:
        self.background = background_mean.float().clone()
        self._routable = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Each finished memory is its own tensor (`memory-<i>`), so an edit that adds a memory stores
        just that one, not a grown copy of all of them (the store keeps an undo per changed tensor).
        Slots a merge freed hold an empty tensor."""
        if self.pooled:  # the memories are derived from the samples
            out = {"counters": self.counters, "background": self.background}
            return {**out, **{f"samples-{e}": samples for e, samples in enumerate(self.edit_samples)}}
        names = ("side", "side_min_score", "memory_eps", "memory_is_shard", "counters", "background")
        out = {name: getattr(self, name) for name in names}
        count = self.memories.shape[0]
        self._slots = max(self._slots, count)
        for i in range(self._slots):
            out[f"memory-{i}"] = self.memories[i] if i < count else torch.zeros(0)
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], keys: torch.Tensor, owners: torch.Tensor) -> None:
        tensors = dict(tensors)
        samples = sorted((k for k in tensors if k.startswith("samples-")), key=lambda k: int(k.split("-")[1]))
        self.edit_samples = [tensors.pop(k).clone() for k in samples]
        slots = sorted((k for k in tensors if k.startswith("memory-")), key=lambda k: int(k.split("-")[1]))
        stacked = [tensors.pop(k) for k in slots]
        if slots:
            count = int(tensors["memory_eps"].shape[0])
            tensors["memories"] = torch.stack(stacked[:count]) if count else self.memories.new_zeros(0, *self.base_weight.shape)
        self._slots = len(slots)
        for name, value in tensors.items():  # stores older than `background` keep zeros (never decentred)
            setattr(self, name, value.clone())
        if self.edit_samples:
            self.memories = self.memories.new_zeros(0, *self.base_weight.shape)
            self.memory_eps = torch.zeros(0)
            self._refit(*range(min(len(self.edit_samples), self.config.pool)))
        self._routable = None


class WiseSession(EditSession):
    def __init__(self, memory: WiseMemory, examples: EditExamples):
        self.memory = memory
        self.examples = examples
        self.start = memory.side.clone()
        self.side = self.start.clone().requires_grad_(True)
        self.mask = memory.gradient_mask()
        grad_mask = self.mask.float()
        self.side.register_hook(lambda grad: grad * grad_mask)
        self.low = memory.base_weight - memory.config.clamp
        self.high = memory.base_weight + memory.config.clamp

    def parameters(self) -> list[torch.Tensor]:
        return [self.side]

    def delta(self, a: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.memory.delta_input(a) @ (self.side - self.memory.base_weight).T

    def aux_loss(self, examples: EditExamples) -> torch.Tensor:
        cfg = self.memory.config
        scores = self.memory.scores(self.side, examples.a, examples.prompt_mask)
        s_in, s_out = scores[examples.in_scope], scores[~examples.in_scope]
        loss = F.relu(cfg.beta - s_in).mean()
        if s_out.numel():
            loss = loss + F.relu(s_out - cfg.alpha).mean() + F.relu(s_out[:, None] - s_in[None, :] + cfg.gamma).mean()
        return loss

    def done(self, target_loss: float, aux_loss: float) -> bool:
        return target_loss + aux_loss <= self.memory.config.stop_loss

    def samples(self, task: torch.Tensor) -> torch.Tensor:
        """What a memory holding this edit must reproduce, as rows [is key, input, output]: the
        teacher's output (`task`) on every token it acted on while training, and its gate output on
        each in-scope row's prompt mean; zero on the out-of-scope rows' prompt means."""
        memory, ex = self.memory, self.examples
        acted = memory.delta_input(ex.a[ex.answer_mask & ex.in_scope[:, None]])
        gates = memory.gate_input(mean_prompt_stats(memory, ex.a, ex.prompt_mask))
        is_key = torch.zeros(len(gates))
        is_key[list(ex.key_rows)] = 1.0
        x = torch.cat([acted, gates])
        y = torch.cat([acted @ task.T, (gates @ task.T) * ex.in_scope[:, None]])
        return torch.cat([torch.cat([torch.zeros(len(acted)), is_key])[:, None], x, y], dim=1)

    def after_step(self) -> None:
        """Clamp to W ± clamp and undo whatever moved outside the shard's mask: the optimizer's weight
        decay (and Adam's normalisation of it) reaches every entry, not just the masked gradients."""
        with torch.no_grad():
            clamped = torch.maximum(torch.minimum(self.side, self.high), self.low)
            self.side.copy_(torch.where(self.mask, clamped, self.start))

    def finish(self) -> dict[str, Any]:
        memory, cfg = self.memory, self.memory.config
        side = self.side.detach()
        rows = list(self.examples.key_rows) if cfg.key_eps else [0]
        score = memory.scores(side, self.examples.a[rows], self.examples.prompt_mask[rows]).min()
        memory.counters[0] += 1
        if memory.pooled:
            memory.counters[2] += 1  # the next edit's teacher gets its own gradient mask
            anchors = [list(ids) for ids in self.examples.anchors] if cfg.subject_anchor else []
            suffices = bool(anchors) and self.examples.anchor_suffices
            memory.anchors.add(len(memory.edit_samples), anchors, suffices)
            memory.add_edit_samples(self.samples(side - memory.base_weight))
            return {"score": float(score), **({"anchors": anchors} if anchors else {}),
                    **({"anchor_suffices": True} if suffices else {})}
        memory.side = side.clone()
        memory.side_min_score = torch.minimum(memory.side_min_score, score)
        memory.counters[1] += 1
        if cfg.save_freq and memory.side_edits >= cfg.save_freq:
            memory._close_side()
        if cfg.merge_freq and memory.num_edits % cfg.merge_freq == 0:
            memory._merge_shards()
        memory._routable = None
        return {"score": float(score)}
