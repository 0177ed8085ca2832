"""Compiled mode (torch.compile + inductor, vLLM's CPU default): the memory runs inside the custom op
`memserve::memory_apply`, opaque to dynamo, so routing stays per request after the one-time trace.

A cold inductor compile of the default model takes 4-7 minutes on 2 cores (cached in
~/.cache/vllm/torch_compile_cache afterwards; about 2.5 minutes warm), so it is compiled once, in bf16
(the dtype that needs compiled mode on CPU), compared with the fp32 transformers reference as bf16
numerics allow. Exactness in fp32 is checked on a tiny random Llama, whose compile takes seconds: what
the op does under dynamo and inductor does not depend on the model's size.
"""

from __future__ import annotations

import gc
import os

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]

NUM_EDITS = int(os.environ.get("MEMSERVE_TEST_EDITS", "24"))
MAX_NEW = 12
# bf16 vs the fp32 reference: a MEMOIR routing score (mask overlap, in steps of 1/top_k = 1/440) may
# move by this much. Measured on the 24-edit store: at most 8/440 (.018) over 75 prompts.
BF16_SCORE_TOLERANCE = 0.03
UNRELATED = [
    "The quick brown fox jumps over the lazy dog. What animal jumps?",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 12?",
    "Name three primary colors.",
    "Who was the first person to walk on the Moon?",
    "Translate 'good morning' into French.",
]


@pytest.fixture(scope="module")
def setup():
    """The store, and the fp32 transformers reference on every edit, its rephrase, chat turns,
    unrelated and locality prompts."""
    import torch

    from memserve.editor import open_session
    from memserve.serving.testing import cached_store, test_facts

    store = cached_store(NUM_EDITS)
    facts = test_facts(NUM_EDITS)
    runner = open_session(store, create=False)
    edited = runner.edited
    try:
        rephrases = [f.rephrases[0] for f in facts if f.rephrases]
        wide = [(f.prompt, False) for f in facts] + [(t, False) for t in rephrases]
        wide += [(f.prompt, True) for f in facts[:8]] + [(t, True) for t in rephrases[:4] + UNRELATED[:3]]
        wide += [(f.locality[0][0], False) for f in facts if f.locality][:6] + [(t, False) for t in UNRELATED]
        wide_ids = [edited.chat.format(t) if chat else edited.encode(t) for t, chat in wide]
        wide_gen, wide_routes = edited.generate(wide_ids, MAX_NEW)
        # the reference's routing decision in detail: every key's overlap with each prompt's mask
        padded, attention, prompt_mask, answer_mask = edited.pad(wide_ids, [len(p) for p in wide_ids])
        with edited.routing(padded, prompt_mask, answer_mask) as state, torch.no_grad():
            edited.model(input_ids=padded, attention_mask=attention.long())
        memory = edited.memory
        overlaps = memory.overlaps(memory.key(state.mean_stats))
        assert state.routes.tolist() == wide_routes.tolist()
        candidates = [route_candidates(row, memory.key_owner, memory.config.tau, BF16_SCORE_TOLERANCE) for row in overlaps]
        targets = [(edited.encode(" " + f.target), edited.encode(f.target)) for f in facts]  # plain / chat answer
        bf16 = dict(texts=wide, ids=wide_ids, gen=wide_gen, routes=wide_routes.tolist(), scores=state.scores.tolist(),
                    candidates=candidates, targets=targets)
    finally:
        runner.store.close()
        del runner, edited
        gc.collect()
    return store, bf16


def route_candidates(overlap, owners, tau: float, tolerance: float) -> set[int]:
    """Routes MEMOIR's rule (best key overlap, >= tau, else -1) can give when every overlap moves by at
    most `tolerance`: owners of keys within 2*tolerance of the best that can reach tau, and -1 if the
    best can fall below tau. One element: the decision is robust."""
    best = float(overlap.max())
    close = (overlap >= best - 2 * tolerance) & (overlap >= tau - tolerance)
    out = {int(o) for o in owners[close].tolist()}
    if best < tau + tolerance:
        out.add(-1)
    return out


def starts_with(tokens: list[int], target: tuple[list[int], ...]) -> bool:
    return any(tokens[: len(t)] == t for t in target)


def test_compiled_fp32_matches_reference_on_a_tiny_model(tmp_path, default_model_dir):
    """fp32 compiled serves exactly what the transformers reference serves, routes included, on edit
    prompts (bare and as chat turns), a rephrase and unrelated prompts."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoTokenizer

    from memserve.editor import load_reference, open_session
    from memserve.facts import Fact
    from memserve.serving.offline import VllmEditedModel
    from memserve.serving.testing import tiny_checkpoint

    from .conftest import FACTS, tiny_config

    tiny_checkpoint(tmp_path / "model", "LlamaForCausalLM", AutoTokenizer.from_pretrained(default_model_dir))
    runner = open_session(tmp_path / "store", tmp_path / "model", method="memoir", config=tiny_config(steps=8))
    runner.apply([Fact(f["prompt"], f["target"], rephrases=tuple(f["rephrases"])) for f in FACTS[:2]])
    runner.store.close()
    reference = load_reference(tmp_path / "store")
    texts = [f["prompt"] for f in FACTS[:2]] + [FACTS[0]["rephrases"][0]] + UNRELATED[:3]
    ids = [reference.encode(t) for t in texts] + [reference.chat.format(t) for t in texts[:2]]
    ref, ref_routes = reference.generate(ids, MAX_NEW)
    assert ref_routes[:2].tolist() == [0, 1] and (ref_routes < 0).any()

    model = VllmEditedModel(tmp_path / "store", enforce_eager=False, max_model_len=256)
    try:
        assert model.llm.apply_model(lambda m: bool(m.model.compiled))[0]
        out, routes = model.generate(ids, MAX_NEW)
        assert routes == ref_routes.tolist()
        assert out == ref
    finally:
        del model
        gc.collect()


def test_compiled_bf16_routes_and_answers_as_reference(setup):
    """bf16 (compiled: `engine_kwargs` picks it for bf16) against the fp32 transformers reference.

    Why fp32: the store's keys and residual are fp32, and transformers' own bf16 path is no steadier
    reference (measured on this set: its batched and batch-1 runs route one chat prompt differently and
    agree on only 53/75 greedy continuations; vLLM bf16 routes all 75 prompts as fp32 does and matches
    63/75 fp32 continuations exactly over 20 tokens, vs 52-55/75 for transformers bf16). bf16 moves the
    routing statistic slightly, so what is asserted:
    - every routing score is within BF16_SCORE_TOLERANCE of the reference's, and every route is one the
      reference's rule gives under that tolerance (the reference's own route wherever its decision is
      not within the tolerance of tau or of another edit's key);
    - every routed prompt answers with its edit's target exactly when the reference does;
    - requests left unrouted get exactly the tokens they get with the memory forced off (route -1) in
      the same engine and the same batch (EOS ignored so both runs see identical batch shapes; bf16
      kernels are batch-shape dependent, so a different batch may legitimately change tokens).
    Continuations beyond the target are not compared: bf16 greedy text drifts from fp32 text."""
    import math

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from memserve.serving.offline import VllmEditedModel

    store, ref = setup
    model = VllmEditedModel(store, dtype="bfloat16")
    try:
        assert model.kwargs["enforce_eager"] is False
        compiled, dtype = model.llm.apply_model(lambda m: (bool(m.model.compiled), str(next(m.parameters()).dtype)))[0]
        assert compiled and dtype == "torch.bfloat16"
        n = len(ref["ids"])
        out, routes = model.generate(ref["ids"], MAX_NEW)
        scores = model.route_scores()

        # routes
        off = [i for i in range(n) if abs(scores[i] - ref["scores"][i]) > BF16_SCORE_TOLERANCE]
        assert not off, [(ref["texts"][i], scores[i], ref["scores"][i]) for i in off]
        wrong = [i for i in range(n) if routes[i] not in ref["candidates"][i]]
        assert not wrong, [(ref["texts"][i], routes[i], ref["routes"][i], ref["candidates"][i]) for i in wrong]
        robust = [i for i in range(n) if len(ref["candidates"][i]) == 1]
        assert len(robust) >= 0.8 * n  # the check above is not vacuous
        assert sum(r >= 0 for r in routes[:NUM_EDITS]) == NUM_EDITS  # every edit prompt finds its edit

        # answers: routed prompts answer their edit's target exactly when the reference does
        for i in range(n):
            if routes[i] >= 0 and routes[i] == ref["routes"][i]:
                target = ref["targets"][routes[i]]
                assert starts_with(out[i], target) == starts_with(ref["gen"][i], target), (ref["texts"][i], out[i], ref["gen"][i])
        answered = sum(r >= 0 and starts_with(out[i], ref["targets"][r]) for i, r in enumerate(routes))
        assert answered >= 0.8 * sum(r >= 0 for r in routes)

        # unrouted requests: exactly the base model of the same engine, same batch
        with_memory, routes_again = model.generate(ref["ids"], MAX_NEW, ignore_eos=True)
        base, base_routes = model.generate(ref["ids"], MAX_NEW, use_memory=False, ignore_eos=True)
        assert routes_again == routes and base_routes == [-1] * n
        unrouted = [i for i in range(n) if routes[i] < 0]
        assert len(unrouted) >= 10
        changed = [i for i in unrouted if with_memory[i] != base[i]]
        assert not changed, [(ref["texts"][i], with_memory[i], base[i]) for i in changed]
        moved = sum(with_memory[i] != base[i] for i in range(n) if routes[i] >= 0)
        assert moved >= 0.8 * (n - len(unrouted))  # the memory does act on routed requests

        exact = sum(out[i] == ref["gen"][i] for i in range(n))
        same_route = sum(routes[i] == ref["routes"][i] for i in range(n))
        worst = max(abs(scores[i] - ref["scores"][i]) for i in range(n))
        assert not any(math.isnan(s) for s in scores)
        print(f"\nbf16 compiled vs fp32 reference, {n} prompts: routes equal {same_route}/{n} ({n - len(robust)} within "
              f"the tolerance of a decision boundary), max score change {worst:.4f}, target answers {answered}, "
              f"identical {MAX_NEW}-token continuations {exact}/{n}, unrouted == memory off: {len(unrouted)}/{len(unrouted)}")
    finally:
        del model
        gc.collect()
