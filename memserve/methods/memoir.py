"""MEMOIR (arXiv 2506.07899): a zero-initialised residual memory written through sparse input masks.

Layer output: `W a + Wm (mask ⊙ a)`. Each edit owns a TopHash mask (k of the I input features) and
only the columns of Wm under its mask learn it (here Wm has `copies` columns per feature and an edit
writes one of them per feature, `MemoirMemory.layout`). Each edit also has one or more routing keys: TopHash
masks of its prompt as written (the first key, equal to its column mask) and as a chat-formatted user
message. A query is routed to the edit owning the key that overlaps its own mask most, if that
overlap reaches `tau`; otherwise the memory adds nothing and the model is exactly the base model.

With `subject_anchor` (the default) only edits whose subject the question names compete
(`memserve.subjects`): the key says what kind of question it is, the anchor what it is about. Edits
without an anchor (no subject given or found) compete everywhere, as all edits did before. With
`relation_check` a named edit's key must also ask what the question asks (`memserve.relation`).

This file is the single home of MEMOIR's routing rule (`MemoirMemory.route`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from memserve.relation import RelationKey
from memserve.subjects import AnchorIndex, Mentions

from .base import NO_ROUTE, EditExamples, EditMemory, EditSession, LastSentence, MethodConfig


@dataclass
class MemoirConfig(MethodConfig):
    # Layer 24 of 30: there the prompt-mean masks of a question and its rephrase overlap most, relative
    # to unrelated questions (ZsRE dev, rephrases above every unrelated prompt: .97 at 24, .83 at 22).
    layer: int = 24
    top_k: int = 440  # active input features per mask (paper: 4096 of 14336 ≈ 28.6%)
    # Minimum key overlap for a question to use an edit. With subject anchors the key only has to say
    # "the same kind of question" (rephrases reach their own key at >= .45: ZsRE dev .993, CounterFact
    # .91-.93); without anchors 0.5 was the choice (unrelated ZsRE dev questions <= .47).
    tau: float = 0.45
    lr: float = 0.02  # ZsRE dev: as good as 0.01 (Rel/Gen/Loc within .005) in ~40% fewer steps
    steps: int = 30
    # Weight decay only touches the edit's own columns (the reference decays all of Wm, slowly
    # eroding earlier edits).
    weight_decay: float = 1e-5
    permutation_seed: int = 1234
    # Feed the memory `a - background` instead of the raw `a` (the paper's choice). Activations share
    # a large common component; removing it makes edits that share mask columns interfere less.
    decentre_input: bool = False
    # Add the request's decentred prompt mean to every token's memory input. On the answer span the
    # token activations of different questions look alike (all end in "?"); the prompt mean is what
    # tells them apart (it is also what TopHash routes on), so edits sharing columns collide less.
    prompt_context: bool = True
    # Multiply each edit's memory input by its own fixed random ±1 pattern (superposition, Cheung et
    # al. 2019). Edits sharing mask columns then write along near-orthogonal directions, so a later
    # edit barely moves an earlier edit's output. The pattern is a hash of the edit's column mask.
    signed_columns: bool = True
    # An edit may only reach questions whose routing span contains its subject's tokens. Prompt-mean
    # keys encode a question's template more than its subject (ZsRE, 998 edits: with keys alone, 25%
    # of unedited same-template chat questions reached some edit; README "MEMOIR at T = 998").
    subject_anchor: bool = True
    # Wm has `copies` x I columns, `copies` of them reading each input feature; each of an edit's k
    # features writes to one of its copies, chosen by a hash of the edit's mask. Edits then share
    # 1/copies as many columns. Shared columns are what makes later edits overwrite earlier ones: with
    # one copy every column of the default model's 576x1536 Wm carries ~290 of 998 ZsRE edits and
    # reliability falls to .45; with 8, .99 (README; the paper's 8B layer has 14,336 columns). With 8,
    # CounterFact's 1,000 chat answers still lost .047 of their tokens, most to an early end-of-turn
    # token that later edits had pushed up; with 16, .022 (README). Serving reads only the k columns of
    # the routed edit, so the cost per routed token does not grow with it; Wm grows (fp32, 56 MB here).
    copies: int = 16
    # A routed request reads the memory with its edit's stored reading (`MemoirMemory.reading`): the
    # context and last-prompt-token input of the edit's own prompt (as written or as a chat turn),
    # not its own. The delta is a function of those inputs, and a rephrase that ends on other words
    # than the edit ("Toko Yasuda, the" -> "Toko Yasuda is incredible at") feeds it an activation the
    # edit never saw: CounterFact T=100, rephrases reaching their edit answer .49 of target tokens,
    # with stored readings .75 (README "Stored readings"). Only with act_on="answer" (the memory
    # then first acts at the last prompt token).
    stored_reading: bool = True
    # A request whose routing span reaches no edit is routed again on the span's last sentence alone
    # (`ChatFormat.last_sentence_start`), with the subjects that sentence names. CounterFact rephrases
    # open with an unrelated sentence ("Toko Yasuda grew up in Osaka. Toko Yasuda is incredible at")
    # that moves the span's mean off the edit's key: T=1000, rephrases reaching their edit .906 ->
    # .940, neighbourhood prompts reaching an edit unchanged (README "Last sentence"). Serving only:
    # applies to stores trained before it too.
    last_sentence_fallback: bool = True
    # Without it (ZsRE T=998): chat-turn answers right .964 (as written .991), 113 of 998 imperfect,
    # 100 of them among the older half of the edits, and the newest quarter's chat answers at a median
    # loss of .061 against .004 as written. With it, 40 ZsRE edits end with chat-turn answer loss
    # median .036 -> .009 in 10.0 -> 11.5 steps per edit (README "Key-row loss").
    key_row_loss: bool = True
    # Of the edits whose subject alone suffices (`subject_suffices`) that a question names, only the
    # one it names first may be reached (else the best key overlap decides, which for passages that
    # name two edited subjects is noise: temporal T=74, own .34-.53 against the other's .36-.53).
    # Serving only: applies to stores trained before it too.
    first_named_subject: bool = True
    # A subject followed by a capitalised word is part of a longer name and does not name the edit
    # ("United Nations General Assembly" for an edit of the United Nations; `subjects` module).
    # Serving only: applies to stores trained before it too.
    whole_names: bool = True
    # An edit whose subject a question names is reached only if the question also asks the same thing:
    # the cosine of its and the edit key prompt's relation keys (`memserve.relation`, a projection of
    # the mean input embedding of the span's tokens outside the subjects it names, learned once per
    # model) must reach the key's threshold, per routing key. Without it another question about an
    # edited subject reaches the edit (CounterFact T = 1000: .943 of them; README "A measured limit");
    # with it, on held-out rows, .109. It also turns some rephrases away (held-out CounterFact Gen
    # .899 -> .876, ZsRE .979 -> .935; README "Relation check"). None (the default): on where a key
    # ships for the store's model (only the default model has one), decided when the store is created
    # and recorded. Edits reached by naming their subject alone are not checked.
    relation_check: bool | None = None
    predated: ClassVar[dict[str, Any]] = {**MethodConfig.predated, "signed_columns": False, "subject_anchor": False,
                                          "copies": 1, "stored_reading": False,
                                          "key_row_loss": False, "relation_check": False}


TIE_PROBE = 8  # nearest keys fetched per query; more only when all of them tie


def newest_nearest(distances: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row of a FAISS result (sorted by distance): the highest id among the nearest ones."""
    return np.where(distances == distances[:, :1], ids, -1).max(1)


class MemoirMemory(EditMemory):
    method = "memoir"
    config_class = MemoirConfig
    column_tensors = ("residual",)  # an edit trains only its mask's k columns of Wm

    def __init__(self, config: MemoirConfig, base_weight: torch.Tensor):
        super().__init__(config, base_weight)
        hidden, inter = self.hidden_size, self.intermediate_size
        if not 0 < config.top_k <= inter:
            raise ValueError(f"top_k must be in 1..{inter}, got {config.top_k}")
        if config.copies < 1:
            raise ValueError(f"copies must be at least 1, got {config.copies}")
        generator = torch.Generator().manual_seed(config.permutation_seed)
        self.register_buffer("residual", torch.zeros(hidden, config.copies * inter))
        self.register_buffer("permutation", torch.randperm(inter, generator=generator))
        self.register_buffer("background", torch.zeros(inter))
        # Per edit (`layout`): its mask's k features, the column of Wm each one writes, and its sign.
        self.register_buffer("edit_features", torch.zeros(0, config.top_k, dtype=torch.long))
        self.register_buffer("edit_columns", torch.zeros(0, config.top_k, dtype=torch.long))
        self.register_buffer("edit_signs", torch.zeros(0, config.top_k))
        self.register_buffer("route_keys", torch.zeros(0, inter, dtype=torch.bool))
        self.register_buffer("key_owner", torch.zeros(0, dtype=torch.long))  # edit of each routing key
        # Per edit with `stored_reading`: [keys, 2, k] its prompt mean and last prompt token's input on
        # its k features, for each of its routing keys' prompts (`MemoirSession.readings`).
        self.edit_readings: list[torch.Tensor] = []
        self.relation: RelationKey | None = None  # with `relation_check`, set by `calibrate` or the store
        self.edit_relations: list[torch.Tensor] = []  # per edit with `relation_check`: [keys, D] its keys' relation keys
        self._key_relations: torch.Tensor | None = None  # [K, D] all of them, in key order
        self._key_index = None  # FAISS binary index over `route_keys` (`best_keys`)
        self.anchors = AnchorIndex()  # each anchored edit's subject token ids

    @property
    def num_edits(self) -> int:
        return self.edit_features.shape[0]

    @property
    def masks(self) -> torch.Tensor:
        """Column mask per edit [E, I] bool."""
        masks = torch.zeros(self.num_edits, self.intermediate_size, dtype=torch.bool)
        return masks.scatter_(1, self.edit_features, True)

    def token_stats(self, a: torch.Tensor) -> torch.Tensor:
        return a.float()

    def key(self, mean_a: torch.Tensor) -> torch.Tensor:
        """TopHash: top-k of the decentred prompt mean, moved by the fixed permutation. [B, I] -> bool [B, I]."""
        feature = (mean_a.float() - self.background).abs()
        top = feature.topk(self.config.top_k, dim=-1).indices
        mask = torch.zeros_like(feature, dtype=torch.bool)
        mask.scatter_(-1, self.permutation[top], True)
        return mask

    def overlaps(self, query_masks: torch.Tensor) -> torch.Tensor:
        """|q ∩ key| / k against every stored routing key: [B, I] -> [B, K] (dense; for analysis)."""
        return (query_masks.float() @ self.route_keys.float().T) / self.config.top_k

    def best_keys(self, query_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each query mask, the routing key of an *unanchored* edit (every edit when anchors are
        off) overlapping it most, the newest one on ties (keys are in edit order, so a re-edit of a
        prompt replaces the old answer), and that overlap |q ∩ key| / k: [B, I] -> ([B] key index,
        -1 if there is none; [B] overlap).

        Exhaustive and exact, through a FAISS binary index: every mask has exactly k bits set, so
        |q ∩ key| = k - hamming(q, key) / 2. A dense [B, I] x [I, K] float product costs ~10 ms per
        routed request at 10,000 edits; the index ~0.1 ms."""
        index, rows = self._faiss_keys()
        if index.ntotal == 0:
            return torch.full((len(query_masks),), -1, dtype=torch.long), torch.zeros(len(query_masks))
        queries = np.packbits(query_masks.numpy(), axis=1)
        count = min(TIE_PROBE, index.ntotal)
        distances, ids = index.search(queries, count)
        nearest = distances[:, 0]
        best = newest_nearest(distances, ids)
        unsure = (distances[:, -1] == nearest) & (count < index.ntotal)  # the tie may go on past `count`
        if unsure.any():
            best[unsure] = newest_nearest(*index.search(queries[unsure], index.ntotal))
        overlap = (self.config.top_k - torch.from_numpy(nearest).float() / 2) / self.config.top_k
        return rows[torch.from_numpy(best)], overlap

    def _faiss_keys(self) -> tuple[Any, torch.Tensor]:
        """FAISS binary index over the routing keys of unanchored edits (all edits without anchors),
        and the key index of each of its rows; kept in step with `add_edit`."""
        if self._key_index is None:
            import faiss

            free = ~self.anchored_edits()[self.key_owner]
            rows = free.nonzero().squeeze(1)
            index = faiss.IndexBinaryFlat(8 * ((self.intermediate_size + 7) // 8))
            if len(rows):
                index.add(np.packbits(self.route_keys[rows].numpy(), axis=1))
            self._key_index = (index, rows)
        return self._key_index

    def anchored_edits(self) -> torch.Tensor:
        """[E] bool: the edits that only questions naming their subject may reach."""
        anchored = torch.zeros(self.num_edits, dtype=torch.bool)
        if self.config.subject_anchor and self.anchors.anchored:
            anchored[sorted(self.anchors.anchored)] = True
        return anchored

    def route(self, mean_stats: torch.Tensor, mentions: Sequence[frozenset[int] | None] | None = None,
              last_sentence: LastSentence | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The edit whose key overlaps the query's most among the eligible ones (`eligible`), if that
        overlap reaches `tau`; a query that reaches no edit so is routed again on its last sentence
        (`last_sentence_fallback`), with the edits that sentence names."""
        routes, scores = self.route_spans(mean_stats, mentions)
        missed = (routes == NO_ROUTE).nonzero().squeeze(1)
        if last_sentence is None or not self.config.last_sentence_fallback or not len(missed):
            return routes, scores
        tail_means, tail_mentions = last_sentence
        again, again_scores = self.route_spans(tail_means[missed], [tail_mentions[i] for i in missed.tolist()])
        found = again != NO_ROUTE
        routes[missed[found]], scores[missed[found]] = again[found], again_scores[found]
        return routes, scores

    def route_spans(self, mean_stats: torch.Tensor, mentions: Sequence[frozenset[int] | None] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`route` on the given means alone. Unanchored edits are searched through the FAISS index;
        the few anchored edits a question names are compared directly."""
        batch = mean_stats.shape[0]
        if self.num_edits == 0:
            return torch.full((batch,), NO_ROUTE, dtype=torch.long), torch.zeros(batch)
        queries = self.key(mean_stats)
        best_key, best_score = self.best_keys(queries)
        passes = best_score >= self.config.tau
        thresholds = self.thresholds() if mentions else None  # once per batch, not per request
        for row, named in enumerate(mentions or ()):
            if not named or not self.config.subject_anchor:
                continue
            keys = torch.isin(self.key_owner, torch.tensor(sorted(named))).nonzero().squeeze(1)
            owners = self.key_owner[keys]
            overlaps = (self.route_keys[keys].float() @ queries[row].float()) / self.config.top_k
            by_name = thresholds[owners].eq(0)
            ok = (overlaps >= self.config.tau) | by_name
            if self.relation is not None:  # only for the rows that name an edit
                ok &= by_name | (self.key_relations()[keys] @ self.relations([named])[0] >= self.relation.threshold)
            if self.config.first_named_subject and isinstance(named, Mentions) and by_name.any():
                first = named.named_first(owners[by_name].tolist())
                ok = (ok & ~by_name) | (by_name & torch.tensor([int(owner) in first for owner in owners]))
            if not ok.any():
                continue
            top = overlaps[ok].max()
            newest = int(keys[ok & (overlaps == top)].max())
            if not passes[row] or top > best_score[row] or (top == best_score[row] and newest > best_key[row]):
                best_key[row], best_score[row], passes[row] = newest, top, True
        best = torch.where(passes & (best_key >= 0), self.key_owner[best_key.clamp_min(0)], NO_ROUTE)
        return best, best_score

    def relations(self, mentions: Sequence[frozenset[int] | None]) -> torch.Tensor | None:
        """[B, D] each span's relation key (of its tokens outside the names it counts, `Mentions.rest`;
        a span without them asks nothing and is close to no edit), when `relation_check` is on."""
        if self.relation is None:
            return None
        return self.relation.embed_tokens([getattr(named, "rest", ()) for named in mentions])

    def key_relations(self) -> torch.Tensor:
        """[K, D] each routing key's relation key, in key order."""
        if self._key_relations is None:
            self._key_relations = torch.cat(self.edit_relations)
        return self._key_relations

    def relation_scores(self, mentions: frozenset[int] | None) -> torch.Tensor | None:
        """[E] per edit, the best cosine of its keys' relation keys with the span's; NaN for edits
        that are not checked (unanchored, or reached by naming their subject alone)."""
        if self.relation is None or not self.num_edits:
            return None
        cosines = self.key_relations() @ self.relations([mentions])[0]
        best = torch.full((self.num_edits,), -1.0).scatter_reduce(0, self.key_owner, cosines, "amax")
        checked = self.anchored_edits() & self.thresholds().gt(0)
        return torch.where(checked, best, torch.nan)

    def thresholds(self) -> torch.Tensor:
        """[E] each edit's key threshold: `tau`, or 0 for an edit whose subject alone is enough."""
        out = torch.full((self.num_edits,), float(self.config.tau))
        if self.config.subject_anchor and self.anchors.sufficient:
            out[sorted(self.anchors.sufficient)] = 0.0
        return out

    def mentioned(self, tokens: Sequence[int], continues_name: Callable[[int], bool] | None = None
                  ) -> frozenset[int] | None:
        if not self.config.subject_anchor:
            return None
        return self.anchors.mentioned(tokens, continues_name if self.config.whole_names else None)

    def eligible(self, mentions: frozenset[int] | None) -> torch.Tensor:
        """Edits a question may reach: those whose subject it names, and those without an anchor; of
        the named ones whose subject alone suffices, only those named first (`first_named_subject`)."""
        allowed = ~self.anchored_edits()
        allowed[sorted(mentions or ())] = True
        if self.config.subject_anchor and self.config.first_named_subject and isinstance(mentions, Mentions):
            sufficient = set(mentions) & self.anchors.sufficient
            allowed[sorted(sufficient - mentions.named_first(sufficient))] = False
        return allowed

    def candidates(self, mean_stats: torch.Tensor, mentions: frozenset[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each edit's best key overlap with the prompt's key (dense): eligible edits first, then by
        overlap, the newest first on ties."""
        if self.num_edits == 0:
            empty = torch.zeros(0)
            return empty.long(), empty, empty, empty.bool()
        overlaps = self.overlaps(self.key(mean_stats[None]))[0]
        per_edit = torch.full((self.num_edits,), -1.0).scatter_reduce(0, self.key_owner, overlaps, "amax")
        allowed = self.eligible(mentions)
        order = torch.tensor(sorted(range(self.num_edits), key=lambda e: (not allowed[e], -float(per_edit[e]), -e)),
                             dtype=torch.long)
        return order, per_edit[order], self.thresholds()[order], allowed[order]

    def delta(self, a: torch.Tensor, routes: torch.Tensor, context: torch.Tensor | None = None,
              fixed_shapes: bool = False) -> torch.Tensor:
        """Each routed row reads the k columns of its edit, weighted by its signed features: one
        `embedding_bag` over the rows of Wm^T for the whole batch (cost rows x k x H, whatever the
        number of edits or `copies`). Unrouted rows get exactly zero by masking, not by selecting
        rows: no data-dependent shapes and no host synchronisation whatever `fixed_shapes` says, so a
        captured graph can replay it."""
        if not self.num_edits:
            return a.new_zeros(a.shape[0], self.hidden_size)
        device, edits = a.device, routes.clamp_min(0)
        features = self.placed("edit_features", device)[edits]
        signs = self.placed("edit_signs", device)[edits] * (routes >= 0).unsqueeze(1)
        columns = self.placed("edit_columns", device)[edits]
        if self.feature_range is not None:  # a tensor-parallel rank: only its features, at local indices
            start, end = self.feature_range
            signs = signs * ((features >= start) & (features < end))
            features = (features - start).clamp(0, end - start - 1)
            columns = columns // self.intermediate_size * (end - start) + features  # rows of its `residual_rows`
        weights = self.memory_input(a, context).gather(1, features) * signs
        rows_of_wm = self.residual_rows(a.dtype, device)
        delta = F.embedding_bag(columns, rows_of_wm, per_sample_weights=weights.to(rows_of_wm.dtype), mode="sum")
        return delta.to(a.dtype)

    def residual_rows(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Wm transposed ([copies * I, H], so an edit's columns are contiguous rows to gather) on
        `device`; a tensor-parallel rank's only its features' columns of every copy ([copies * width, H],
        a 1/N share). In bf16/fp16 when the served model runs in one (a reduced-precision matmul, like
        the model's own layers), else fp32, exactly the trained memory."""
        dtype = dtype if dtype in (torch.bfloat16, torch.float16) else self.residual.dtype

        def make() -> torch.Tensor:
            rows = self.residual.T
            if self.feature_range is not None:
                start, end = self.feature_range
                rows = rows.unflatten(0, (self.config.copies, self.intermediate_size))[:, start:end].flatten(0, 1)
            return rows.to(dtype).contiguous()

        return self.served("residual_rows", device, make, self.residual, key=dtype)

    def memory_input(self, a: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """What Wm reads for each token: `a` (the paper), optionally decentred and/or with the
        request's decentred prompt mean (`context`, the mean of `token_stats` over its prompt)."""
        x = a.to(self.residual.dtype)
        background = self.rank_background(a.device)
        if self.feature_range is not None:  # `a` is a tensor-parallel rank's shard of the features
            context = None if context is None else context[..., self.feature_range[0] : self.feature_range[1]]
        if self.config.decentre_input:
            x = x - background
        if self.config.prompt_context and context is not None:
            x = x + (context.to(x.dtype) - background)
        return x

    def layout(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where the edit with column mask `mask` [I] lives: its features (the mask's k indices), the
        column of Wm each one writes (its copy of the feature, `copies`) and the sign it is read with
        (`signed_columns`). A pure function of the mask bits, so reloads and rollbacks find the same
        columns, and a re-edit of the same prompt overwrites the old answer's columns."""
        features = mask.nonzero().squeeze(1)
        digest = hashlib.blake2b(np.packbits(mask.numpy()).tobytes(), digest_size=8)
        digest.update(str(self.config.permutation_seed).encode())
        rng = np.random.default_rng(int.from_bytes(digest.digest(), "little"))
        signs = torch.from_numpy(rng.integers(0, 2, mask.numel(), dtype=np.int8) * 2 - 1)[features].float()
        copy = torch.from_numpy(rng.integers(0, self.config.copies, mask.numel()))[features]
        columns = copy * self.intermediate_size + features
        return features, columns, signs if self.config.signed_columns else torch.ones_like(signs)

    def route_label(self, route: int) -> str:
        return "none" if route < 0 else f"edit-{route}"

    def shard_features(self, start: int, end: int) -> None:
        self.feature_range = (start, end)

    def neutral_context(self) -> torch.Tensor:
        return self.background  # `memory_input` adds `context - background`

    @property
    def reads_stored_inputs(self) -> bool:
        return self.config.stored_reading and self.config.act_on == "answer"

    def reading(self, route: int, mean_stats: torch.Tensor | None,
                chat_turn: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A request routed to edit `route` reads the memory as the edit's own prompt of the same form
        did: the stored reading of the edit's chat-turn key (its second) for a chat turn, else of its
        prompt as written, placed on the edit's features; the other features are never read for this
        edit. By form, not by which key the request's mask overlaps most: a written question whose
        two keys overlap it almost equally would otherwise read the chat turn's assistant-marker
        input and answer as a chat reply would (no leading space, or end-of-answer at once)."""
        if not self.reads_stored_inputs or not 0 <= route < len(self.edit_readings):
            return mean_stats, None
        stored = self.edit_readings[route]
        key = 1 if chat_turn and len(stored) > 1 else 0
        features = self.edit_features[route]
        context = self.background.clone()
        context[features] = stored[key, 0]
        first = torch.zeros_like(self.background)
        first[features] = stored[key, 1]
        if self.feature_range is not None:
            first = first[self.feature_range[0] : self.feature_range[1]]
        return context, first

    def start_edit(self, examples: EditExamples) -> EditSession:
        return MemoirSession(self, examples)

    def calibrate(self, background_mean: torch.Tensor, model: str | None = None,
                  input_embeddings: torch.Tensor | None = None) -> None:
        self.background = background_mean.float().clone()
        if self.config.relation_check is None:
            self.config.relation_check = RelationKey.ships_for(model)
        if self.config.relation_check:
            self.relation = RelationKey.shipped(model, input_embeddings)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Wm and its fixed inputs, and one small tensor per edit's reading (`reading-<i>`), so a
        commit adds one, not a grown copy of all of them (the store keeps an undo per changed tensor)."""
        readings = {f"reading-{e}": reading for e, reading in enumerate(self.edit_readings)}
        relations = {f"key-relations-{e}": keys for e, keys in enumerate(self.edit_relations)}
        relation = {} if self.relation is None else self.relation.tensors()
        return {"residual": self.residual, "permutation": self.permutation, "background": self.background,
                **readings, **relations, **relation}

    def load_anchors(self, anchors: Sequence[tuple[Sequence[Sequence[int]], bool, bool]]) -> None:
        """Each edit's subject anchor variants (none: unanchored), whether naming them suffices and
        whether its prompt carries the name on."""
        self.anchors = AnchorIndex.of_edits(anchors)
        self._key_index = None

    def load_state(self, tensors: dict[str, torch.Tensor], keys: torch.Tensor, owners: torch.Tensor) -> None:
        for name in ("residual", "permutation", "background"):
            setattr(self, name, tensors[name].clone())
        self.edit_readings = [tensors[k].clone() for k in per_edit(tensors, "reading-")]
        self.edit_relations = [tensors[k].clone() for k in per_edit(tensors, "key-relations-")]
        self.relation = RelationKey.from_tensors(tensors)
        self._key_relations = None
        first = torch.ones_like(owners, dtype=torch.bool)
        first[1:] = owners[1:] != owners[:-1]
        self._set_layouts(keys[first])
        self.route_keys, self.key_owner = keys.clone(), owners.clone()
        self._key_index = None

    def add_edit(self, keys: torch.Tensor, anchors: Sequence[Sequence[int]] = (), anchor_suffices: bool = False,
                 anchor_open_name: bool = False) -> None:
        """Append an edit whose column mask is `keys[0]`, whose routing keys are `keys` [n, I] and
        whose subject appears as one of the token id sequences `anchors` (none: unanchored; naming
        it is enough with `anchor_suffices`; a longer name may mean it with `anchor_open_name`)."""
        free = not (self.config.subject_anchor and any(anchors))
        self.anchors.add(self.num_edits, anchors, anchor_suffices, anchor_open_name)
        first = len(self.route_keys)
        self._set_layouts(keys[:1], append=True)
        self.route_keys = torch.cat([self.route_keys, keys])
        self.key_owner = torch.cat([self.key_owner, torch.full((len(keys),), self.num_edits - 1)])
        self._key_relations = None
        if self._key_index is not None and free:  # anchored keys are compared directly, not indexed
            index, rows = self._key_index
            index.add(np.packbits(keys.numpy(), axis=1))
            self._key_index = (index, torch.cat([rows, torch.arange(first, first + len(keys))]))


    def _set_layouts(self, masks: torch.Tensor, append: bool = False) -> None:
        """Each edit's `layout` as rows of `edit_features`, `edit_columns` and `edit_signs`."""
        layouts = [self.layout(mask) for mask in masks]
        for part, name in enumerate(("edit_features", "edit_columns", "edit_signs")):
            old = getattr(self, name)
            new = torch.stack([layout[part] for layout in layouts]) if layouts else old[:0]
            setattr(self, name, torch.cat([old, new]) if append else new)


def per_edit(tensors: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """The names `<prefix><edit>` among `tensors`, in edit order."""
    return sorted((k for k in tensors if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))


class MemoirSession(EditSession):
    """Trains only the k columns of Wm the new edit's mask selects (`layout`), as one [H, k] parameter."""

    def __init__(self, memory: MemoirMemory, examples: EditExamples):
        self.memory = memory
        rows = list(examples.key_rows)
        means = torch.stack([examples.a[r][examples.prompt_mask[r]].float().mean(0) for r in rows])
        self.keys = memory.key(means)
        self.relations = None if memory.relation is None else memory.relation.embed_tokens(examples.key_tokens)
        self.mask = self.keys[0]  # the bare prompt's key chooses the columns
        self.features, self.columns, self.signs = memory.layout(self.mask)
        self.weight = memory.residual[:, self.columns].clone().requires_grad_(True)
        self.anchors = examples.anchors if memory.config.subject_anchor else ()
        self.anchor_suffices = examples.anchor_suffices
        self.anchor_open_name = examples.anchor_open_name
        self.readings = self._readings(examples, rows) if memory.reads_stored_inputs else None

    def _readings(self, examples: EditExamples, rows: list[int]) -> torch.Tensor:
        """[keys, 2, k]: each key prompt's mean statistic (the `context` it was trained with) and its
        last prompt token's input, on the edit's features (`MemoirMemory.reading`)."""
        out = []
        for row in rows:
            mean = examples.a[row][examples.prompt_mask[row]].float().mean(0)
            last = examples.a[row, int(examples.answer_mask[row].float().argmax())].float()
            out.append(torch.stack([mean[self.features], last[self.features]]))
        return torch.stack(out)

    def parameters(self) -> list[torch.Tensor]:
        return [self.weight]

    def delta(self, a: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.memory.memory_input(a, context)[:, self.features] * self.signs
        return x @ self.weight.T

    def done(self, target_loss: float, aux_loss: float) -> bool:
        return target_loss <= self.memory.config.stop_loss

    def finish(self) -> dict[str, Any]:
        memory = self.memory
        memory.residual[:, self.columns] = self.weight.detach()
        anchors = [list(ids) for ids in self.anchors]
        suffices = bool(anchors) and self.anchor_suffices
        memory.add_edit(self.keys, anchors, suffices, bool(anchors) and self.anchor_open_name)
        if self.readings is not None:
            memory.edit_readings.append(self.readings)
        if self.relations is not None:
            memory.edit_relations.append(self.relations)
        return {"key": self.keys, **({"anchors": anchors} if anchors else {}), **({"anchor_suffices": True} if suffices else {})}

    def written_columns(self) -> dict[str, torch.Tensor]:
        return {"residual": self.columns}
