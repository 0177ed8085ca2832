"""Routing rules and memory arithmetic of both methods, on small random tensors."""

import pytest
import torch

from memserve.methods import NO_ROUTE, MemoirConfig, MemoirMemory, WiseConfig, WiseMemory, route_explanation
from memserve.methods.wise import ties_merge

H, I = 8, 64


def memoir(k=16, tau=0.5):
    torch.manual_seed(0)
    memory = MemoirMemory(MemoirConfig(layer=0, top_k=k, tau=tau), torch.randn(H, I))
    memory.calibrate(torch.zeros(I))
    return memory


def test_memoir_key_is_topk_through_fixed_permutation():
    memory = memoir(k=16)
    feature = torch.randn(3, I)
    mask = memory.key(feature)
    assert mask.dtype == torch.bool and mask.sum(-1).tolist() == [16, 16, 16]
    top = feature[0].abs().topk(16).indices
    assert set(mask[0].nonzero().squeeze(1).tolist()) == set(memory.permutation[top].tolist())
    # Decentring changes which features are picked.
    memory.calibrate(feature[0])
    assert not torch.equal(memory.key(feature[:1]), mask[:1])


def test_memoir_routes_to_best_overlap_above_tau_newest_on_ties():
    memory = memoir(k=16, tau=0.5)
    a = torch.randn(3, I)
    assert memory.route(a)[0].tolist() == [NO_ROUTE] * 3  # no edits yet
    for row in a[:2]:
        memory.add_edit(memory.key(row[None]))
    routes, scores = memory.route(a)
    assert routes[:2].tolist() == [0, 1] and scores[:2].tolist() == [1.0, 1.0]
    assert routes[2].item() == NO_ROUTE or scores[2] >= 0.5
    memory.add_edit(memory.key(a[:1]))  # same prompt edited again
    assert memory.route(a[:1])[0].item() == 2


def test_memoir_second_routing_key_routes_to_its_edit_and_uses_first_key_columns():
    memory = memoir(k=16, tau=0.9)
    a = torch.randn(3, I)
    memory.add_edit(memory.key(a[:1]))
    memory.add_edit(memory.key(a[1:3]))  # edit 1: keys from a[1] (columns) and a[2] (e.g. chat)
    assert memory.route(a)[0].tolist() == [0, 1, 1]
    assert torch.equal(memory.masks[1], memory.key(a[1:2])[0])


def test_memoir_delta_with_one_copy_is_the_papers_masked_product():
    torch.manual_seed(0)
    memory = MemoirMemory(MemoirConfig(layer=0, top_k=16, copies=1, signed_columns=False), torch.randn(H, I))
    memory.calibrate(torch.zeros(I))
    a = torch.randn(4, I)
    for row in a[:2]:
        memory.add_edit(memory.key(row[None]))
    memory.residual = torch.randn(H, I)
    out = memory.delta(a, torch.tensor([0, 1, NO_ROUTE, 0]))
    masks = memory.masks.float()
    assert torch.allclose(out[0], memory.residual @ (a[0] * masks[0]), atol=1e-5)
    assert torch.allclose(out[1], memory.residual @ (a[1] * masks[1]), atol=1e-5)
    assert torch.all(out[2] == 0)
    assert torch.allclose(out[3], memory.residual @ (a[3] * masks[0]), atol=1e-5)


def test_memoir_copies_give_edits_sharing_features_their_own_columns():
    torch.manual_seed(0)
    config = MemoirConfig(layer=0, top_k=32, tau=0.5, copies=4)
    memory = MemoirMemory(config, torch.randn(H, I))
    memory.calibrate(torch.zeros(I))
    assert memory.residual.shape == (H, 4 * I)
    a = torch.randn(2, I)
    for row in a:
        memory.add_edit(memory.key(row[None]))
    features, columns = memory.edit_features, memory.edit_columns
    assert torch.equal(columns % I, features)  # each column reads its own feature
    assert all(len(set(row.tolist())) == config.top_k for row in columns)
    shared_features = set(features[0].tolist()) & set(features[1].tolist())
    shared_columns = set(columns[0].tolist()) & set(columns[1].tolist())
    assert shared_features and len(shared_columns) < len(shared_features)
    # Writing the columns only edit 1 owns leaves edit 0's output exactly as it was.
    memory.residual = torch.randn(H, 4 * I)
    before = memory.delta(a, torch.tensor([0, 0]))
    only_1 = torch.tensor(sorted(set(columns[1].tolist()) - set(columns[0].tolist())))
    memory.residual[:, only_1] += 1.0
    assert torch.equal(memory.delta(a, torch.tensor([0, 0])), before)
    assert not torch.allclose(memory.delta(a, torch.tensor([1, 1])), before)
    # Stores written before copies existed keep their one-copy memory.
    assert MemoirConfig.from_stored({"layer": 0}).copies == 1


def test_memoir_signed_columns_stable_per_mask_and_shared_columns_decorrelate():
    torch.manual_seed(0)
    config = MemoirConfig(layer=0, top_k=32, tau=0.5, signed_columns=True, copies=1)
    memory = MemoirMemory(config, torch.randn(H, I))
    memory.calibrate(torch.zeros(I))
    a = torch.randn(2, I)
    for row in a:
        memory.add_edit(memory.key(row[None]))
    signs = torch.zeros(2, I).scatter_(1, memory.edit_features, memory.edit_signs)
    assert torch.equal(signs.abs().bool(), memory.masks)  # zero off the mask, +-1 on it
    shared = memory.masks[0] & memory.masks[1]
    assert shared.any() and not torch.equal(signs[0][shared], signs[1][shared])
    # The layout depends on the mask bits only: a reloaded memory (undo, rollback, server) agrees.
    again = MemoirMemory(config, torch.randn(H, I))
    again.load_state(memory.state_tensors(), memory.route_keys, memory.key_owner)
    for name in ("edit_features", "edit_columns", "edit_signs"):
        assert torch.equal(getattr(again, name), getattr(memory, name))
    memory.residual = torch.randn(H, I)
    out = memory.delta(a, torch.tensor([0, 1]))
    assert torch.allclose(out[0], memory.residual @ (a[0] * signs[0]), atol=1e-5)
    # Stores written before the option existed keep the unsigned memory they were trained with.
    assert not MemoirConfig.from_stored({"layer": 0}).signed_columns
    assert MemoirConfig.from_dict({"layer": 0}).signed_columns


def test_wise_routes_by_score_threshold_and_picks_highest():
    torch.manual_seed(0)
    base = torch.randn(H, I)
    paper = dict(score="tokens", decentre=False, normalise=False, save_freq=500, merge_freq=1000, consolidate="ties")  # the paper's gate
    memory = WiseMemory(WiseConfig(layer=0, act_ratio=0.5, **paper), base)
    a = torch.randn(2, I)
    assert memory.route(memory.token_stats(a))[0].tolist() == [NO_ROUTE, NO_ROUTE]
    state = {**memory.state_tensors(), "side": base + torch.randn(H, I), "side_min_score": torch.tensor(10.0),
             "counters": torch.tensor([1, 1, 0])}
    memory.load_state(state, torch.zeros(0, I, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    stats = memory.token_stats(a)
    assert torch.allclose(stats[:, 0], ((memory.side - base) @ a.T).norm(dim=0))
    routes = memory.route(torch.tensor([[4.9], [5.1]]))[0]  # eps = 0.5 * 10
    assert routes.tolist() == [NO_ROUTE, 0]
    assert torch.allclose(memory.delta(a, torch.tensor([0, NO_ROUTE]))[0], (memory.side - base) @ a[0])


def test_ties_merge_trims_elects_sign_and_averages_agreeing_entries():
    vectors = torch.tensor([[4.0, -1.0, 2.0, 0.1], [2.0, 3.0, -2.0, 0.1], [-1.0, 5.0, -4.0, 0.1]])
    merged = ties_merge(vectors, density=0.5)
    # kept per row (top 2): [4, 2], [3, -2] (ties by >= keep 2.0 too), [5, -4]
    assert merged[0].item() == 3.0  # 4 and 2 agree on +; -1 trimmed
    assert merged[1].item() == 4.0  # 3 and 5 agree
    assert merged[3].item() == 0.0  # trimmed everywhere


def test_wise_shards_and_merges_on_schedule():
    torch.manual_seed(0)
    base = torch.randn(H, I)
    memory = WiseMemory(WiseConfig(layer=0, save_freq=2, merge_freq=4, consolidate="ties"), base)
    for step in range(4):
        memory.side = memory.side + 0.1 * torch.randn(H, I)
        memory.side_min_score = torch.tensor(1.0)
        memory.counters[0] += 1
        memory.counters[1] += 1
        if memory.side_edits >= 2:
            memory._close_side()
        if memory.num_edits % 4 == 0:
            memory._merge_shards()
        if step == 1:
            assert memory.memories.shape[0] == 1 and memory.memory_is_shard.tolist() == [True]
    assert memory.memories.shape[0] == 1 and memory.memory_is_shard.tolist() == [False]
    assert memory.side_edits == 0 and torch.equal(memory.side, base)
    assert int(memory.counters[2]) == 2  # two shards, two different gradient masks


def test_wise_prompt_score_is_normalised_decentred_gain_of_prompt_mean():
    torch.manual_seed(0)
    base = torch.randn(H, I)
    config = WiseConfig(layer=0, act_ratio=0.5, score="prompt", decentre=True, normalise=True, save_freq=1, merge_freq=1,
                        consolidate="ties")
    memory = WiseMemory(config, base)
    memory.calibrate(torch.randn(I))
    tokens = torch.randn(5, I)
    assert torch.equal(memory.token_stats(tokens), tokens)  # the caller averages `a` itself
    # Two one-edit memories (Retrieve): each its own task vector and threshold.
    deltas = [torch.randn(H, I), torch.randn(H, I)]
    for delta in deltas:
        memory.side = base + delta
        memory.side_min_score = torch.tensor(2.0)
        memory.counters[0] += 1
        memory.counters[1] += 1
        memory._close_side()
        memory._merge_shards()
    memory._routable = None
    mean = tokens.mean(0, keepdim=True)
    x = mean - memory.background
    expected = torch.stack([(d @ x[0]).norm() / x.norm() for d in deltas])
    assert torch.allclose(memory.gate_scores(mean)[0], expected, rtol=1e-5)
    routes, best = memory.route(mean)
    assert routes.item() == int(expected.argmax()) and torch.isclose(best[0], expected.max())
    # The training score is the same number, from the token activations and the prompt mask.
    side = memory.base_weight + deltas[1]
    got = memory.scores(side, tokens[None], torch.ones(1, 5, dtype=torch.bool))
    assert torch.allclose(got[0], expected[1], rtol=1e-5)
    # The background itself scores 0 everywhere, below every memory's eps (0.5 * 2.0): no edit.
    assert memory.route(memory.background[None])[0].item() == NO_ROUTE


def test_wise_state_keeps_one_tensor_per_memory_and_reloads():
    torch.manual_seed(0)
    base = torch.randn(H, I)
    memory = WiseMemory(WiseConfig(layer=0, save_freq=1, merge_freq=2, retrieve=False, consolidate="ties"), base)
    for _ in range(2):
        memory.side = base + torch.randn(H, I)
        memory.side_min_score = torch.tensor(1.0)
        memory.counters[0] += 1
        memory.counters[1] += 1
        memory._close_side()
        state = memory.state_tensors()
    assert {"memory-0", "memory-1"} <= set(state) and "memories" not in state
    memory._merge_shards()  # two shards fold into one: the freed slot is persisted empty
    state = memory.state_tensors()
    assert state["memory-0"].shape == (H, I) and state["memory-1"].numel() == 0
    again = WiseMemory(memory.config, base)
    again.load_state(state, torch.zeros(0, I, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    assert torch.equal(again.memories, memory.memories) and torch.equal(again.memory_eps, memory.memory_eps)
    # Stores written before per-memory tensors (one stacked `memories`) still load.
    old = {k: v for k, v in state.items() if not k.startswith("memory-")} | {"memories": memory.memories}
    again = WiseMemory(memory.config, base)
    again.load_state(old, torch.zeros(0, I, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    assert torch.equal(again.memories, memory.memories)
    # Options a store predates keep the behaviour it was trained with.
    stored = WiseConfig.from_stored({"layer": 22})
    assert stored.score == "tokens" and not stored.decentre and stored.negatives == 1 and not stored.normalise


def test_wise_lstsq_pool_fits_every_edit_of_a_memory_jointly_and_reloads_from_samples():
    """Edits share the pool's memories round-robin; a memory is the ridge fit of all its edits'
    samples, so an edit that joins does not overwrite the earlier ones, and the memories are derived
    data: the store keeps the samples only."""
    torch.manual_seed(0)
    base = torch.randn(H, I)
    memory = WiseMemory(WiseConfig(layer=0, pool=2, ridge=1e-6, decentre=False), base)
    inputs = torch.linalg.qr(torch.randn(I, I))[0][:9]  # orthonormal: one pair per edit and a probe
    teachers = [torch.randn(H, I) for _ in range(4)]
    for e in range(4):
        x = inputs[2 * e : 2 * e + 2]
        memory.add_edit_samples(torch.cat([torch.tensor([[1.0], [0.0]]), x, x @ teachers[e].T], dim=1))
    assert memory.memories.shape[0] == 2  # at most `pool` memories
    for e in range(4):  # edit e lives in memory e % 2 and the fit reproduces its teacher there
        x = inputs[2 * e : 2 * e + 2]
        got = x @ (memory.memories[e % 2] - base).T
        assert torch.allclose(got, x @ teachers[e].T, atol=1e-3)
    probe = inputs[8:9]  # spanned by no edit: the memories add (nearly) nothing
    assert (probe @ (memory.memories - base).transpose(1, 2)).abs().max() < 1e-3
    # Routing by keys: a query near edit 2's key goes to memory 0; far from every key, nowhere.
    near = inputs[4] + 0.3 * inputs[8]  # cosine .96 to edit 2's key
    assert memory.route(near[None])[0].tolist() == [0]
    assert memory.route(inputs[8:9])[0].tolist() == [NO_ROUTE]
    # An anchored edit (3, memory 1) is reached only by a question naming its subject.
    memory.load_anchors([((), False, False), ((), False, False), ((), False, False), (((7, 8),), False, False)])
    assert memory.route(inputs[6:7])[0].tolist() == [NO_ROUTE]
    assert memory.route(inputs[6:7], [memory.mentioned([5, 7, 8])])[0].tolist() == [1]
    explained = route_explanation(memory, inputs[6], top=2, mentions=memory.mentioned([7, 8]))
    assert explained["route"] == 1 == explained["candidates"][0]["route"] and explained["candidates"][0]["passes"]
    state = memory.state_tensors()
    assert {f"samples-{e}" for e in range(4)} <= set(state) and not any(k.startswith("memory-") for k in state)
    again = WiseMemory(memory.config, base)
    again.load_state(state, torch.zeros(0, I, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    assert torch.equal(again.memories, memory.memories) and torch.equal(again.memory_eps, memory.memory_eps)
    assert WiseConfig.from_stored({"layer": 22}).consolidate == "ties"  # stores before the pool keep theirs
    with pytest.raises(ValueError, match="score='prompt'"):
        WiseMemory(WiseConfig(layer=0, score="tokens"), base)


def test_wise_margin_pick_prefers_the_memory_furthest_above_its_own_threshold():
    base = torch.randn(H, I)
    for margin_pick, expected in ((True, 0), (False, 1)):
        memory = WiseMemory(WiseConfig(layer=0, score="tokens", margin_pick=margin_pick, consolidate="ties"), base)
        memory.memories = torch.stack([base, base])
        memory.memory_eps = torch.tensor([1.0, 10.0])
        memory.memory_is_shard = torch.tensor([False, False])
        memory._routable = None
        assert memory.route(torch.tensor([[2.0, 12.0]]))[0].item() == expected  # ratios 2.0 vs 1.2
    assert not WiseConfig.from_stored({"layer": 22}).margin_pick


def test_memoir_index_routing_equals_the_dense_overlap_rule():
    """`best_keys` (FAISS, hamming) picks what the dense overlap matrix picks: the highest overlap,
    the newest key on ties, also when more keys tie than the index fetches at first."""
    memory = memoir(k=16, tau=0.3)
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(6, I, generator=generator)
    for step in range(40):  # many re-edits of the same few prompts: long runs of identical keys
        memory.add_edit(memory.key(base[step % 3][None] if step % 4 else torch.randn(2, I, generator=generator)))
    queries = memory.key(torch.cat([base, torch.randn(20, I, generator=generator)]))
    dense = memory.overlaps(queries)
    best_score, best_from_end = dense.flip(-1).max(dim=-1)
    expected = dense.shape[-1] - 1 - best_from_end
    keys, scores = memory.best_keys(queries)
    assert torch.equal(keys, expected) and torch.allclose(scores, best_score)
    routes, _ = memory.route(torch.cat([base[:3], base[:3]]))
    assert routes.tolist() == [memory.key_owner[keys[i]].item() for i in range(3)] * 2


def test_memoir_bf16_delta_uses_a_fresh_copy_of_the_residual():
    memory = memoir(k=16)
    a = torch.randn(3, I)
    memory.add_edit(memory.key(a[:1]))
    memory.residual = torch.randn(memory.residual.shape)
    routes = torch.tensor([0, 0, NO_ROUTE])
    first = memory.delta(a.bfloat16(), routes)
    assert first.dtype == torch.bfloat16 and torch.allclose(first.float(), memory.delta(a, routes), rtol=0.05, atol=0.05)
    memory.residual[:, :] *= 2  # an in-place write (as `finish` does) must not serve the stale copy
    assert torch.allclose(memory.delta(a.bfloat16(), routes).float(), 2 * first.float(), rtol=0.02, atol=0.02)


def test_route_explanation_agrees_with_the_routing_rule():
    """`route_explanation` (what `memserve route` and the server show) names the slot `route`
    picks first, with that slot's score; for both methods, routed and not."""
    memory = memoir(k=16, tau=0.5)
    a = torch.randn(4, I)
    for row in a[:3]:
        memory.add_edit(memory.key(row[None]))
    memory.add_edit(memory.key(a[:1]))  # edit 3 re-edits edit 0's prompt: the newest wins the tie
    for row in a:
        route, score = (x.item() for x in memory.route(row[None]))
        explained = route_explanation(memory, row, top=4)
        first = explained["candidates"][0]
        assert explained["route"] == route and abs(explained["score"] - score) < 1e-6
        assert first["score"] == max(c["score"] for c in explained["candidates"]) and first["threshold"] == 0.5
        if route >= 0:
            assert first["route"] == route and first["passes"]
        else:
            assert not any(c["passes"] for c in explained["candidates"])
    assert route_explanation(memory, a[0], top=4)["route"] == 3
    for margin_pick, expected in ((True, 0), (False, 1)):
        base = torch.randn(H, I)
        wise = WiseMemory(WiseConfig(layer=0, score="tokens", margin_pick=margin_pick, consolidate="ties"), base)
        wise.memories = torch.stack([base, base, base])
        wise.memory_eps = torch.tensor([1.0, 10.0, 50.0])
        wise.memory_is_shard = torch.tensor([False, False, False])
        wise._routable = None
        explained = route_explanation(wise, torch.tensor([2.0, 12.0, 49.0]), top=3)
        assert explained["route"] == expected == explained["candidates"][0]["route"]
        assert [c["passes"] for c in explained["candidates"]] == [True, True, False]  # memory 2 is below its threshold


def test_memoir_subject_anchor_gates_edits_on_their_subject_being_named():
    """An anchored edit is reached only by questions whose span names its subject, however close
    their key; an unanchored edit competes everywhere; a store predating anchors routes on keys."""
    memory = memoir(k=16, tau=0.5)
    a = torch.randn(3, I)
    memory.add_edit(memory.key(a[:1]), anchors=[[7, 8]])
    memory.add_edit(memory.key(a[1:2]))  # no subject: unanchored
    named, other = memory.mentioned([1, 7, 8, 2]), memory.mentioned([1, 7, 9, 8])
    assert named == {0} and other == set()
    routes, scores = memory.route(a[:2], [named, named])
    assert routes.tolist() == [0, 1] and scores.tolist() == [1.0, 1.0]
    routes, _ = memory.route(a[:2], [other, other])  # same key, subject not named: edit 0 is out
    assert routes[0].item() in (NO_ROUTE, 1) and routes[1].item() == 1
    assert memory.route(a[:1])[0].item() != 0  # no span tokens known: no anchored edit
    explained = route_explanation(memory, a[0], top=2, mentions=other)
    assert [(c["route"], c["subject_named"]) for c in explained["candidates"]][1] == (0, False)
    assert not explained["candidates"][1]["passes"]

    old = MemoirMemory(MemoirConfig.from_stored({"layer": 0, "top_k": 16, "tau": 0.5}), torch.randn(H, I))
    old.calibrate(torch.zeros(I))
    old.add_edit(old.key(a[:1]), anchors=[[7, 8]])
    assert old.mentioned([7, 8]) is None and old.route(a[:1], [None])[0].item() == 0


def test_memoir_routes_on_the_last_sentence_only_when_the_whole_span_reaches_nothing():
    """The last sentence (its mean, the subjects it names) decides only for a span routed nowhere;
    `route_explanation` says so; a memory with the fallback off ignores it."""
    memory = memoir(k=16, tau=0.5)
    a = torch.randn(3, I)
    memory.add_edit(memory.key(a[:1]))
    memory.add_edit(memory.key(a[1:2]), anchors=[[7]])
    far = a[2:]
    assert memory.route(far, [None])[0].item() == NO_ROUTE
    routes, scores = memory.route(far, [None], (a[:1], [None]))
    assert routes.tolist() == [0] and scores.tolist() == [1.0]
    assert memory.route(a[:1], [None], (a[1:2], [memory.mentioned([7])]))[0].tolist() == [0]  # whole span decided
    assert memory.route(far, [None], (a[1:2], [memory.mentioned([7])]))[0].tolist() == [1]
    # the sentence must name the subject itself: the span naming it elsewhere is not enough
    assert memory.route(far, [memory.mentioned([7])], (a[1:2], [memory.mentioned([1])]))[0].tolist() == [NO_ROUTE]
    explained = route_explanation(memory, far[0], top=2, last_sentence=(a[1], memory.mentioned([7])))
    assert explained["route"] == 1 and explained["routed_on"] == "last sentence"
    assert explained["candidates"][0]["route"] == 1 and explained["candidates"][0]["passes"]
    assert route_explanation(memory, a[0], top=2, last_sentence=(a[1], None))["routed_on"] == "span"
    memory.config.last_sentence_fallback = False
    assert memory.route(far, [None], (a[:1], [None]))[0].tolist() == [NO_ROUTE]


def test_memoir_anchored_routing_keeps_the_newest_edit_on_ties():
    memory = memoir(k=16, tau=0.5)
    a = torch.randn(1, I)
    memory.add_edit(memory.key(a), anchors=[[5]])
    memory.add_edit(memory.key(a), anchors=[[5]])  # the same question edited again
    assert memory.route(a, [memory.mentioned([5])])[0].item() == 1


def test_memoir_mixed_anchored_and_unanchored_routing_equals_the_dense_eligible_rule():
    """Unanchored edits through the FAISS index, named anchored edits directly: the same decision
    as the dense rule over every eligible key (the newest on ties), for random mentions."""
    memory = memoir(k=16, tau=0.3)
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(4, I, generator=generator)
    for step in range(24):
        mean = base[step % 4][None] if step % 3 else torch.randn(1, I, generator=generator)
        memory.add_edit(memory.key(torch.cat([mean, mean + 0.3 * torch.randn(1, I, generator=generator)])),
                        anchors=[[step]] if step % 2 else [])
    queries = torch.cat([base, torch.randn(4, I, generator=generator)])
    mentions = [frozenset(torch.randint(0, 24, (3,), generator=generator).tolist()) for _ in queries]
    routes, scores = memory.route(queries, mentions)
    overlaps = memory.overlaps(memory.key(queries))
    for row, named in enumerate(mentions):
        allowed = memory.eligible(named)[memory.key_owner]
        masked = torch.where(allowed, overlaps[row], torch.tensor(-1.0))
        top = masked.max()
        want = int(memory.key_owner[(masked == top).nonzero().max()]) if top >= 0.3 else NO_ROUTE
        assert routes[row].item() == want and abs(scores[row].item() - top.item()) < 1e-6


def test_memoir_an_edit_whose_subject_suffices_is_reached_by_naming_it_whatever_the_key():
    memory = memoir(k=16, tau=0.9)
    a = torch.randn(2, I)
    memory.add_edit(memory.key(a[:1]), anchors=[[4]], anchor_suffices=True)
    memory.add_edit(memory.key(a[:1]), anchors=[[5]])
    far = torch.randn(1, I)  # its key overlaps neither edit's key by anything near tau
    assert memory.route(far, [memory.mentioned([1, 4])])[0].item() == 0
    assert memory.route(far, [memory.mentioned([1, 5])])[0].item() == NO_ROUTE
    assert memory.route(far, [memory.mentioned([1, 2])])[0].item() == NO_ROUTE
    assert memory.thresholds().tolist() == pytest.approx([0.0, 0.9])


def test_memoir_stores_before_stored_readings_read_each_request_as_it_is():
    """Stored readings are the default for new stores; a store written before them keeps serving as it
    was trained: a routed request reads its own prompt mean and its own last-token input."""
    assert MemoirConfig().stored_reading and not MemoirConfig.from_stored({"layer": 0}).stored_reading
    memory = MemoirMemory(MemoirConfig.from_stored({"layer": 0, "top_k": 16}), torch.randn(H, I))
    memory.add_edit(memory.key(torch.randn(1, I)))
    mean = torch.randn(I)
    context, last_input = memory.reading(0, mean)
    assert context is mean and last_input is None and not memory.reads_stored_inputs


def test_memoir_reading_follows_the_request_form_not_the_nearer_key():
    """A routed request reads the stored reading of its edit's key prompt of its own form: a chat turn
    the chat key's, a written question the written key's, even when its mask overlaps the chat key
    more; an edit with one key gives it to both forms."""
    memory = MemoirMemory(MemoirConfig(top_k=16), torch.randn(H, I))
    memory.calibrate(torch.zeros(I))
    written, chat = torch.randn(2, I)
    keys = memory.key(torch.stack([written, chat]))
    readings = torch.randn(2, 2, 16)
    memory.load_state({**memory.state_tensors(), "reading-0": readings}, keys, torch.tensor([0, 0]))
    features = memory.edit_features[0]
    for chat_turn, key in ((False, 0), (True, 1)):
        context, last_input = memory.reading(0, chat, chat_turn=chat_turn)  # its mask is the chat key's
        torch.testing.assert_close(context[features], readings[key, 0])
        torch.testing.assert_close(last_input[features], readings[key, 1])
    memory.load_state({**memory.state_tensors(), "reading-0": readings[:1]}, keys[:1], torch.tensor([0]))
    context, _ = memory.reading(0, chat, chat_turn=True)
    torch.testing.assert_close(context[memory.edit_features[0]], readings[0, 0])


def test_memoir_of_two_named_subjects_that_suffice_the_one_named_first_is_reached():
    """A passage naming two edited subjects that each suffice reaches the one it names first, whatever
    the key overlaps say; an edit that only passes by its key is not affected, and without positions
    (or with the option off) the best overlap decides as before."""
    from memserve.subjects import Mentions

    memory = memoir(k=16, tau=0.9)
    a = torch.randn(3, I)
    memory.add_edit(memory.key(a[:1]), anchors=[[4]], anchor_suffices=True)
    memory.add_edit(memory.key(a[1:2]), anchors=[[5]], anchor_suffices=True)
    memory.add_edit(memory.key(a[2:3]), anchors=[[6]])
    assert isinstance(memory.mentioned([5, 1, 4]), Mentions) and memory.mentioned([5, 1, 4, 5]).first == {1: 0, 0: 2}
    near_0, near_1 = a[:1], a[1:2]  # queries whose keys are those of edit 0 and edit 1
    assert memory.route(near_0, [memory.mentioned([5, 1, 4])])[0].item() == 1  # 5 (edit 1) comes first
    explained = route_explanation(memory, near_0[0], mentions=memory.mentioned([5, 1, 4]))
    assert explained["route"] == 1 and explained["candidates"][0]["route"] == 1  # what decided comes first
    assert {c["route"]: c["passes"] for c in explained["candidates"]}[0] is False  # named later: out
    assert memory.route(near_1, [memory.mentioned([4, 1, 5])])[0].item() == 0
    assert memory.route(near_0, [frozenset({0, 1})])[0].item() == 0  # no positions: the best overlap
    assert memory.route(a[2:3], [memory.mentioned([4, 6])])[0].item() == 2  # edit 2 passes by its key
    memory.config.first_named_subject = False
    assert memory.route(near_0, [memory.mentioned([5, 1, 4])])[0].item() == 0


def test_memoir_relation_check_defaults_to_on_where_a_relation_key_ships():
    """Left unset, `relation_check` is decided at `calibrate` by whether a key ships for the model
    (the resolved value is what the manifest records); stores without the option keep no check."""
    from memserve.models import DEFAULT_MODEL_NAME

    assert MemoirConfig().relation_check is None and MemoirConfig.from_stored({"layer": 0}).relation_check is False
    other = MemoirMemory(MemoirConfig(layer=0, top_k=16), torch.randn(H, I))
    other.calibrate(torch.zeros(I), "some/other-model", torch.randn(20, 4))
    assert other.config.relation_check is False and other.relation is None
    default = MemoirMemory(MemoirConfig(layer=0, top_k=16), torch.randn(H, I))
    with pytest.raises(RuntimeError, match="576-wide input embeddings"):  # the shipped key was looked up
        default.calibrate(torch.zeros(I), DEFAULT_MODEL_NAME, torch.randn(20, 4))
    assert default.config.relation_check is True


def test_memoir_relation_check_turns_away_a_named_question_that_asks_something_else():
    """With `relation_check`, a question naming an anchored edit's subject and passing its key still
    needs the relation key of its other tokens (`Mentions.rest`) close to the edit's; edits reached by
    their subject alone are not checked. The projection, its token table and the edits' relation keys
    go with the state and route the same after a reload; a store of the older layer-activation keys is
    refused with the way out."""
    from memserve.relation import RelationKey, RelationKeyError

    torch.manual_seed(1)
    memory = MemoirMemory(MemoirConfig(layer=0, top_k=16, tau=0.5, relation_check=True), torch.randn(H, I))
    with pytest.raises(RuntimeError, match="no relation key ships for"):
        memory.calibrate(torch.zeros(I), "some/other-model", torch.randn(20, 4))
    embeddings = torch.zeros(20, 4)  # input embeddings of 20 token ids: 1 and 2 ask one thing, 3 another
    embeddings[1, 0] = embeddings[2, 0] = embeddings[3, 1] = 1.0
    memory.relation = RelationKey(torch.zeros(4), torch.ones(4), torch.eye(4)[:, :2], threshold=0.5).with_embeddings(embeddings)
    edit = torch.randn(I)
    memory.add_edit(memory.key(edit[None]), anchors=[[7]])
    memory.add_edit(memory.key(edit[None]), anchors=[[9]], anchor_suffices=True)
    memory.edit_relations = [memory.relation.embed_tokens([[7, 1, 2]]), memory.relation.embed_tokens([[9]])]
    same, other, by_name = memory.mentioned([7, 2, 1]), memory.mentioned([3, 7]), memory.mentioned([9, 3])
    assert same.rest == (2, 1) and other.rest == (3,)  # the subject's tokens are not what is asked
    assert memory.route(edit[None], [same])[0].item() == 0
    assert memory.route(edit[None], [other])[0].item() == NO_ROUTE
    assert memory.route(edit[None], [by_name])[0].item() == 1  # its subject alone suffices
    explained = route_explanation(memory, edit, top=2, mentions=other)
    checked = next(c for c in explained["candidates"] if c["route"] == 0)
    assert checked["relation"] < checked["relation_threshold"] and not checked["passes"]
    assert "relation" not in next(c for c in explained["candidates"] if c["route"] == 1)

    again = MemoirMemory(MemoirConfig(layer=0, top_k=16, tau=0.5, relation_check=True), torch.randn(H, I))
    again.load_state(memory.state_tensors(), memory.route_keys, memory.key_owner)
    again.load_anchors([(((7,),), False, False), (((9,),), True, False)])
    assert again.relation.threshold == 0.5 and torch.equal(again.relation.tokens, memory.relation.tokens)
    for tokens in ([7, 2, 1], [3, 7], [9, 3]):
        assert again.route(edit[None], [again.mentioned(tokens)])[0].item() == memory.route(edit[None], [memory.mentioned(tokens)])[0].item()
    with pytest.raises(RelationKeyError, match="make the store again"):
        again.load_state({**memory.state_tensors(), "relation-layer": torch.tensor([24])}, memory.route_keys, memory.key_owner)