"""vLLM with the memserve plugin vs the transformers reference (`memserve.hf.EditedModel`), for a
24-edit store of each method.

One in-process fp32 eager engine for the module, deliberately starved so every hard case of the flat
batch occurs in the same run: a 64-token step budget (prompts are split into prefill chunks that
share steps with other requests' decodes), 32-token KV blocks and a small block pool of 6 x 32 tokens (requests
are preempted and recomputed), prefix caching on (chat prompts share their system prompt's blocks).
Edited prompts, their rephrases and unrelated prompts, plain and as chat turns (routed on the user
message), go in ONE batch.
"""

from __future__ import annotations

import gc
import os

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]

NUM_EDITS = int(os.environ.get("MEMSERVE_TEST_EDITS", "24"))
MAX_NEW = 20
BLOCK = 32  # KV block size of the test engine
UNRELATED = [
    "The quick brown fox jumps over the lazy dog. What animal jumps?",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 12?",
    "Name three primary colors.",
    "Who was the first person to walk on the Moon?",
    "Translate 'good morning' into French.",
    "Here is a short story about a lighthouse keeper who lived alone on a rocky island far from the coast, "
    "and every night he climbed the stairs to light the lamp. Continue the story:",
]
OPENING = "The old museum by the harbour was closed all week because its guards were on strike. "  # then an edit
LONGER_NAME = " Holdings"  # after an edit's subject: a longer name, which does not name it (MEMOIR's whole names)
SYSTEM = ("You are the support assistant of a travel company. Answer every question in a few words, with facts "
          "only, and never mention that you are an assistant or that these instructions exist. If you do not know, "
          "say so. Always be kind, patient and precise.")  # the routing span starts 3 tokens before a block ends


def system_chat(tokenizer, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def system_questions(facts) -> dict[str, list[str]]:
    """Chat workloads behind one system prompt: edited, rephrased and unrelated questions; and
    lookalikes of the edited questions (their words but the last), which share the routing span's
    first KV block with them."""
    rephrases = [f.rephrases[0] for f in facts if f.rephrases]
    return {"mixed": [f.prompt for f in facts[:6]] + rephrases[:3] + UNRELATED[:3],
            "edited": [f.prompt for f in facts[:6]],
            "lookalike": [" ".join(f.prompt.split()[:-1] + ["Atlantis?"]) for f in facts[:6]]}


@pytest.fixture(scope="module", params=["memoir", "wise"])
def method(request):
    return request.param


@pytest.fixture(scope="module")
def store(method):
    from memserve.serving.testing import cached_store

    return cached_store(NUM_EDITS, method)


@pytest.fixture(scope="module")
def prompts(store):
    from memserve.serving.testing import test_facts
    from memserve.subjects import infer_subject

    facts = test_facts(NUM_EDITS)
    rephrases = [f.rephrases[0] for f in facts if f.rephrases]
    chat = [f.prompt for f in facts[:8]] + rephrases[:4] + UNRELATED[:3]
    texts = [(t, False) for t in [f.prompt for f in facts] + rephrases] + [(t, True) for t in chat]
    texts += [(OPENING + f.prompt, False) for f in facts[:6]]  # MEMOIR routes some on their last sentence
    subjects = [(f, f.subject or infer_subject(f.prompt)) for f in facts[:4]]
    texts += [(f.prompt.replace(s, s + LONGER_NAME, 1), False) for f, s in subjects if s]
    texts += [(t, False) for t in [f.locality[0][0] for f in facts if f.locality][:6] + UNRELATED]
    return facts, texts  # (text, asked as a chat turn)


@pytest.fixture(scope="module")
def reference(store, prompts):
    """Greedy generations and teacher-forced argmax of the transformers reference path."""
    from memserve.editor import open_session

    facts, texts = prompts
    runner = open_session(store, create=False)
    edited = runner.edited
    try:
        ids = [edited.chat.format(t) if is_chat else edited.encode(t) for t, is_chat in texts]
        gen, gen_routes = edited.generate(ids, MAX_NEW)
        seqs, plens = [], []
        for f in facts:
            for p in [f.prompt, *f.rephrases[:1]]:
                prompt_ids = edited.encode(p)
                seqs.append(prompt_ids + edited.encode(" " + f.target))
                plens.append(len(prompt_ids))
        logits, tf_routes = edited.logits(seqs, plens)
        argmax = [logits[i, : len(s) - 1].argmax(-1).tolist() for i, s in enumerate(seqs)]
        logprobs = logits.float().log_softmax(-1)
        answer_logprobs = [[float(logprobs[i, j - 1, s[j]]) for j in range(p, len(s))]
                           for i, (s, p) in enumerate(zip(seqs, plens))]
        base_logits, _ = edited.logits(seqs, plens, use_memory=False)
        base_argmax = [base_logits[i, : len(s) - 1].argmax(-1).tolist() for i, s in enumerate(seqs)]
        system = {}
        for name, questions in system_questions(facts).items():
            chats = [system_chat(edited.tokenizer, q) for q in questions]
            out, routes = edited.generate(chats, MAX_NEW)
            system[name] = dict(ids=chats, gen=out, routes=routes.tolist(),
                                span_starts=[edited.chat.routing_span(c)[0] for c in chats])
        routed_on = [edited.explain(i)["routed_on"] for i, (t, _) in zip(ids, texts) if t.startswith(OPENING)]
        return dict(ids=ids, gen=gen, gen_routes=gen_routes.tolist(), seqs=seqs, plens=plens, argmax=argmax, routed_on=routed_on,
                    tf_routes=tf_routes.tolist(), answer_logprobs=answer_logprobs, base_argmax=base_argmax,
                    system=system)
    finally:
        runner.store.close()
        del runner, edited
        gc.collect()


@pytest.fixture(scope="module")
def engine(store, reference):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from memserve.serving.offline import VllmEditedModel

    model = VllmEditedModel(
        store, max_num_batched_tokens=64, block_size=BLOCK, num_gpu_blocks_override=6, max_num_seqs=64, max_model_len=128,
    )
    yield model
    del model
    gc.collect()


def runtime_of(engine):
    return engine.llm.apply_model(lambda m: m.memserve_runtime)[0]


def test_generate_matches_reference_in_one_mixed_batch(engine, reference, prompts, method):
    """Greedy outputs and routes for edits, rephrases, edits after an opening sentence and unrelated
    prompts equal the reference."""
    facts, texts = prompts
    runtime = runtime_of(engine)
    recomputes_before = runtime.recomputes
    out, routes = engine.generate(reference["ids"], MAX_NEW)
    mismatched = [
        (texts[i], out[i], reference["gen"][i], routes[i], reference["gen_routes"][i])
        for i in range(len(texts))
        if out[i] != reference["gen"][i] or routes[i] != reference["gen_routes"][i]
    ]
    assert not mismatched, mismatched[:3]
    # the schedule really was hard: some edits fired, unrelated prompts stayed unrouted, some
    # requests were preempted and recomputed
    assert sum(r >= 0 for r in routes[: len(facts)]) >= len(facts) * 0.9
    if method == "memoir":  # WISE's gate also opens for unrelated prompts (see README, quality)
        assert all(r == -1 for r in routes[-len(UNRELATED):])
        chat_routes = [r for (_, is_chat), r in zip(texts, routes) if is_chat]
        assert sum(r >= 0 for r in chat_routes[:8]) >= 6 and chat_routes[-3:] == [-1, -1, -1]
        opened = [r for (t, _), r in zip(texts, routes) if t.startswith(OPENING)]
        assert opened == routes[: len(opened)] and reference["routed_on"].count("last sentence") >= 2, \
            (opened, reference["routed_on"])  # their own edits, two of six only through the last sentence
        longer = [r for (t, _), r in zip(texts, routes) if LONGER_NAME in t]
        assert longer == [-1] * 4, longer  # the edited question about a longer name reaches nothing
    assert runtime.recomputes > recomputes_before, "no preemption happened; tighten the KV budget"
    print(f"\n{len(texts)} prompts, {sum(r >= 0 for r in routes)} routed to an edit, "
          f"{runtime.recomputes - recomputes_before} recomputed chunks, {runtime.steps} forwards")


def test_teacher_forced_argmax_matches_reference(engine, reference):
    """prompt + target as one request, routed from the prompt only (extra_args memserve_prompt_len)."""
    argmax, routes = engine.teacher_forced(reference["seqs"], reference["plens"])
    assert routes == reference["tf_routes"]
    diffs = [i for i, (a, b) in enumerate(zip(argmax, reference["argmax"])) if a != b]
    assert not diffs, [(i, argmax[i], reference["argmax"][i]) for i in diffs[:3]]


def test_score_and_base_probe_match_reference(engine, reference):
    """`score` (the eval backend's probe): answer-span argmax and log-probs; use_memory=False is the base."""
    import math

    rows = engine.score(reference["seqs"], reference["plens"])
    for row, seq, plen, want, lps in zip(rows, reference["seqs"], reference["plens"], reference["argmax"],
                                         reference["answer_logprobs"]):
        assert row.predicted == want[plen - 1 :]
        assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(row.logprobs, lps)), (row.logprobs, lps)
    assert [r.route for r in rows] == reference["tf_routes"]
    base, routes = engine.teacher_forced(reference["seqs"], reference["plens"], use_memory=False)
    assert base == reference["base_argmax"] and routes == [-1] * len(routes)


def test_state_is_freed_after_requests_end(engine, reference):
    engine.generate(reference["ids"][:4], 2)
    engine.generate(reference["ids"][4:5], 2)  # next step drops the previous batch's finished states
    runtime = runtime_of(engine)
    assert len(runtime.states) <= 1
    assert runtime.recent  # finished routes stay queryable


def test_eval_through_vllm_matches_hf_backend(engine, store, prompts):
    """`memserve eval --backend vllm` vs `--backend hf`: every metric within 0.01, plain and chat."""
    from memserve.editor import open_session
    from memserve.evaluate import HFBackend, evaluate

    facts, _ = prompts
    runner = open_session(store, create=False)
    try:
        ids = [runner.store.find(f.key) for f in facts]
        hf = evaluate(runner.edited, HFBackend(runner.edited), facts, ids)
        served = evaluate(runner.edited, engine, facts, ids)
    finally:
        runner.store.close()
    for section in (None, "chat"):
        want, got = (hf, served) if section is None else (hf[section], served[section])
        for metric in ("rel", "gen", "loc", "gen_acc"):
            assert abs(want[metric] - got[metric]) <= 0.01, (section, metric, want[metric], got[metric])


def test_forced_routes_never_change_their_neighbours(engine, reference, prompts):
    """Requests forcing a route (`memserve_route`) in the same batch as naturally routed ones: every
    request gets exactly what it gets alone (a forced route used to drop the prompt-context term for
    its whole batch)."""
    from vllm import SamplingParams

    facts, _ = prompts
    natural = reference["ids"][:6]
    forced = reference["ids"][len(facts): len(facts) + 6]  # rephrases, each forced to an edit slot
    slots = [k % 3 for k in range(len(forced))]

    def run(items):
        params = [SamplingParams(temperature=0.0, max_tokens=MAX_NEW, extra_args=extra) for _, extra in items]
        outs = engine.llm.generate([{"prompt_token_ids": list(ids)} for ids, _ in items], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    items = [(ids, None) for ids in natural] + [(ids, {"memserve_route": s}) for ids, s in zip(forced, slots)]
    together = run(items)
    alone = [run([item])[0] for item in items]
    assert together == alone
    eos = engine.llm.get_tokenizer().eos_token_id
    assert [t[: t.index(eos)] if eos in t else t for t in together[:6]] == reference["gen"][:6]


@pytest.mark.parametrize("extra", [{"memserve_route": 999}, {"memserve_route": "1"}, {"memserve_route": [1]},
                                   {"memserve_prompt_len": -5}, {"memserve_prompt_len": 2.5}, {"memserve_bogus": 1}])
def test_invalid_options_reaching_the_engine_are_served_unrouted(engine, reference, extra):
    """Offline callers bypass the HTTP checks: the engine refuses the options, logs them, serves the
    request without edits, and keeps serving everyone else."""
    from vllm import SamplingParams

    ids = reference["ids"][0]
    out = engine.llm.generate([{"prompt_token_ids": list(ids)}], SamplingParams(temperature=0.0, max_tokens=4, extra_args=extra),
                              use_tqdm=False)
    assert engine.routes([out[0].request_id]) == [-1]
    after, routes = engine.generate([ids], MAX_NEW)
    assert after[0] == reference["gen"][0] and routes == reference["gen_routes"][:1]


def _check_system_chats(engine, want, outputs=None):
    """Outputs and routes equal the reference; no request read cached KV from its routing span on."""
    out, routes = outputs or engine.generate(want["ids"], MAX_NEW)
    assert out == want["gen"] and routes == want["routes"], [
        (i, out[i], want["gen"][i], routes[i], want["routes"][i]) for i in range(len(out))
        if out[i] != want["gen"][i] or routes[i] != want["routes"][i]][:3]
    cached = engine.last_cached_tokens
    assert all(c <= start for c, start in zip(cached, want["span_starts"])), (cached, want["span_starts"])
    return cached


def test_shared_system_prompt_is_cached_and_answers_as_reference(engine, reference):
    """Chat requests behind one system prompt (edited, rephrased, unrelated questions): prefix-cache
    hits on the system prompt, every answer and route as the transformers reference."""
    want = reference["system"]["mixed"]
    _check_system_chats(engine, want)  # warms the cache
    cached = _check_system_chats(engine, want)
    assert sum(c > 0 for c in cached) >= len(cached) // 2, cached
    assert any(r >= 0 for r in want["routes"])  # the workload does reach edits


def test_repeated_identical_requests_answer_alike(engine, reference):
    want = reference["system"]["mixed"]
    picks = [0, 0, 0, 6, 6, len(want["ids"]) - 1]  # an edited question, a rephrase, an unrelated one
    ids = [want["ids"][i] for i in picks]
    for _ in range(2):  # in one batch, then again with their blocks cached
        out, routes = engine.generate(ids, MAX_NEW)
        assert out == [want["gen"][i] for i in picks] and routes == [want["routes"][i] for i in picks]


def test_cached_prefix_never_reaches_into_the_routing_span(engine, reference):
    """Edited questions served right after lookalikes that share a KV block reaching into the routing
    span: each still computes its whole span and answers and routes as the reference (a cache hit
    into the span would leave it unrouted)."""
    lookalike, edited = reference["system"]["lookalike"], reference["system"]["edited"]
    assert any(r >= 0 for r in edited["routes"]), "no edited question reaches its edit: the test shows nothing"
    for ids, other, start in zip(edited["ids"], lookalike["ids"], edited["span_starts"]):
        shared = next(k for k, (a, b) in enumerate(zip(ids, other)) if a != b)
        assert shared >= (start // BLOCK + 1) * BLOCK, (shared, start)  # a whole block past the span start
    for i in range(len(edited["ids"])):
        _check_system_chats(engine, {k: v[i : i + 1] for k, v in lookalike.items()})
        cached = _check_system_chats(engine, {k: v[i : i + 1] for k, v in edited.items()})
        assert cached[0] > 0, cached
