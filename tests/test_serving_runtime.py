"""The vLLM routing state without vLLM: flat batches, chunked prefill, preemption, freeing.

A small random MEMOIR memory; each check compares `MemoryRuntime.apply` over a schedule of flat
batches with the reference rule (route from the mean over all prompt tokens, memory on the answer
span) computed per request in one piece, as `memserve.hf.MemoryDownProj` does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memserve.methods import NO_ROUTE, MemoirConfig, MemoirMemory, WiseConfig, WiseMemory, mean_prompt_stats
from memserve.serving.options import RequestOptions
from memserve.serving.runtime import BatchPlan, MemoryRuntime, external_id

H, I = 8, 64


def make_memoir(num_edits: int = 3, seed: int = 0, stored_reading: bool = True) -> tuple[MemoirMemory, list[torch.Tensor]]:
    """A memory whose edits are keyed on the prompts of `num_edits` random request activations (and
    read with random stored readings, `MemoirMemory.reading`, unless `stored_reading` is off)."""
    g = torch.Generator().manual_seed(seed)
    memory = MemoirMemory(MemoirConfig(top_k=16, tau=0.6, stored_reading=stored_reading), torch.randn(H, I, generator=g))
    memory.calibrate(torch.zeros(I))
    prompts = [torch.randn(5 + 3 * i, I, generator=g) for i in range(num_edits)]
    # two keys per edit, as the trainer gives (as written, as a chat turn), each with its own reading
    keys = torch.cat([memory.key(p.mean(0, keepdim=True)) for p in prompts]).repeat_interleave(2, 0)
    state = {k: v.clone() for k, v in memory.state_tensors().items()}
    state["residual"] = torch.randn(memory.residual.shape, generator=g)
    if stored_reading:
        state.update({f"reading-{e}": torch.randn(2, 2, 16, generator=g) for e in range(num_edits)})
    memory.load_state(state, keys, torch.arange(num_edits).repeat_interleave(2))
    return memory, prompts


def reference(memory, seq: torch.Tensor, plen: int, span: tuple[int, int] | None = None) -> tuple[torch.Tensor, int]:
    """Delta over a whole sequence [T, I] of prompt length plen routed from its positions `span`
    (default: the whole prompt), read as the memory says (`reading`): the hf.py rule."""
    prompt_mask = torch.zeros(1, seq.shape[0], dtype=torch.bool)
    prompt_mask[0, slice(*(span or (0, plen)))] = True
    stats = mean_prompt_stats(memory, seq[None], prompt_mask)
    routes, _ = memory.route(stats)
    token_routes = torch.full((seq.shape[0],), NO_ROUTE, dtype=torch.long)
    token_routes[plen - 1 :] = routes[0]
    chat_turn = span is not None and span[1] < plen
    context, last_input = memory.reading(int(routes[0]), stats[0], chat_turn=chat_turn)
    if last_input is not None:
        seq = seq.clone()
        seq[plen - 1] = last_input
    return memory.delta(seq, token_routes, context.expand(seq.shape[0], -1)), int(routes[0])


def run_schedule(runtime: MemoryRuntime, seqs: dict[str, torch.Tensor], plens: dict[str, int], steps, spans=None,
                 sentences=None):
    """steps: list of [(req_id, first_pos, n_tokens)]; spans: req_id -> routing span (default: the
    whole prompt); sentences: req_id -> where its span's last sentence starts (default: one sentence).
    Returns per-request delta rows by position."""
    spans, sentences = spans or {}, sentences or {}
    got = {rid: {} for rid in seqs}
    for step in steps:
        rows, starts, first, lens, ids = [], [0], [], [], []
        for rid, p0, n in step:
            rows.append(seqs[rid][p0 : p0 + n])
            starts.append(starts[-1] + n)
            first.append(p0)
            lens.append(plens[rid])
            ids.append(rid)
        a = torch.cat(rows)
        route_spans = np.array([spans.get(rid, (0, plens[rid])) for rid in ids])
        sentence_starts = np.array([sentences.get(rid, span[0]) for rid, span in zip(ids, route_spans)])
        runtime.begin_step(BatchPlan(ids, np.array(starts), np.array(first), np.array(lens), route_spans=route_spans,
                                     sentence_starts=sentence_starts))
        out = runtime.apply(torch.zeros(a.shape[0], H), a)
        runtime.end_step()
        for k, (rid, p0, n) in enumerate(step):
            for j in range(n):
                got[rid][p0 + j] = out[starts[k] + j]
    return got


def check(memory, runtime, seqs, plens, got):
    for rid, seq in seqs.items():
        want, route = reference(memory, seq, plens[rid])
        assert runtime.route_info(rid).route == route
        for pos, row in got[rid].items():
            torch.testing.assert_close(row, want[pos], msg=f"{rid} position {pos}")


@pytest.mark.parametrize("dense", [False, True], ids=["compact", "dense"])
def test_mixed_batch_chunked_prefill_and_decode(dense):
    """Both delta paths (compact on the CPU; dense, as on a GPU) give the reference rows."""
    memory, prompts = make_memoir()
    g = torch.Generator().manual_seed(1)
    # r0 = edit 0's prompt, r1 = edit 2's prompt, r2 = unrelated; each followed by 4 "generated" tokens
    seqs = {
        "r0": torch.cat([prompts[0], torch.randn(4, I, generator=g)]),
        "r1": torch.cat([prompts[2], torch.randn(4, I, generator=g)]),
        "r2": torch.randn(9 + 4, I, generator=g),
    }
    plens = {"r0": 5, "r1": 11, "r2": 9}
    steps = [
        [("r0", 0, 5), ("r1", 0, 4)],  # r0 whole prompt, r1 first chunk
        [("r0", 5, 1), ("r1", 4, 4), ("r2", 0, 3)],  # decode, middle chunk, first chunk
        [("r0", 6, 1), ("r1", 8, 3), ("r2", 3, 6)],  # r1 and r2 finish their prompts
        [("r1", 11, 1), ("r2", 9, 1), ("r0", 7, 1)],  # order changes between steps
        [("r1", 12, 1), ("r2", 10, 3)],
    ]
    runtime = MemoryRuntime(memory, dense=dense)
    got = run_schedule(runtime, seqs, plens, steps)
    check(memory, runtime, seqs, plens, got)
    assert runtime.route_info("r0").route == 0 and runtime.route_info("r1").route == 2
    assert runtime.route_info("r2").route == NO_ROUTE
    # prompt tokens before the last one never get the memory
    assert all(got["r0"][p].abs().max() == 0 for p in range(4))
    assert got["r0"][4].abs().max() > 0


def test_routing_span_inside_the_prompt_with_a_chunk_starting_after_it():
    """A chat prompt is routed on its user message only, also when a prefill chunk starts after the
    message (on the template's closing tokens): those positions are not a gap."""
    memory, prompts = make_memoir()
    g = torch.Generator().manual_seed(3)
    seq = torch.cat([torch.randn(2, I, generator=g), prompts[0], torch.randn(3 + 3, I, generator=g)])
    steps = [[("c", 0, 4)], [("c", 4, 4)], [("c", 8, 2)], [("c", 10, 1)], [("c", 11, 1)]]
    runtime = MemoryRuntime(memory)
    got = run_schedule(runtime, {"c": seq}, {"c": 10}, steps, spans={"c": (2, 7)})
    assert runtime.route_info("c").route == 0
    want, _ = reference(memory, seq, 10, span=(2, 7))
    for pos, row in got["c"].items():
        torch.testing.assert_close(row, want[pos], msg=f"position {pos}")


def opening_sentence_then(prompt: torch.Tensor, seed: int = 4) -> torch.Tensor:
    """An edit's prompt after an unrelated opening sentence (far enough to move the prompt mean off
    the edit's key: tau 0.6 of 16 features)."""
    return torch.cat([3 * torch.randn(7, I, generator=torch.Generator().manual_seed(seed)), prompt])


@pytest.mark.parametrize("dense", [False, True], ids=["compact", "dense"])
def test_last_sentence_routes_a_prompt_the_whole_span_does_not_reach(dense):
    """A prompt routed nowhere by its whole span is routed on its last sentence, with the sums of that
    sentence kept across prefill chunks that straddle where it starts (and across a recomputed
    chunk), exactly as the reference routes it in one piece; a memory without the fallback does not."""
    memory, prompts = make_memoir()
    g = torch.Generator().manual_seed(5)
    prompt = opening_sentence_then(prompts[1])  # 7 + 8 tokens, the last sentence from position 7
    seq = torch.cat([prompt, torch.randn(3, I, generator=g)])
    plen = prompt.shape[0]
    assert memory.route(prompt.mean(0, keepdim=True))[0].item() == NO_ROUTE
    whole, tail = torch.ones(1, plen, dtype=torch.bool), torch.zeros(1, plen, dtype=torch.bool)
    tail[0, 7:] = True
    means = [mean_prompt_stats(memory, prompt[None], mask) for mask in (whole, tail)]
    assert memory.route(means[0], [None], (means[1], [None]))[0].item() == 1
    steps = [[("t", 0, 5)], [("t", 5, 5)], [("t", 3, 9)], [("t", 12, 3)], [("t", 15, 1)], [("t", 16, 1)]]
    runtime = MemoryRuntime(memory, dense=dense)
    got = run_schedule(runtime, {"t": seq}, {"t": plen}, steps, sentences={"t": 7})
    assert runtime.route_info("t").route == 1 and runtime.recomputes == 1
    context, last_input = memory.reading(1, means[0][0])
    read = seq.clone()
    read[plen - 1] = last_input
    routes = torch.full((seq.shape[0],), NO_ROUTE)
    routes[plen - 1 :] = 1
    want = memory.delta(read, routes, context.expand(seq.shape[0], -1))
    for pos, row in got["t"].items():
        torch.testing.assert_close(row, want[pos], msg=f"position {pos}")
    memory.config.last_sentence_fallback = False
    runtime = MemoryRuntime(memory, dense=dense)
    run_schedule(runtime, {"t": seq}, {"t": plen}, steps, sentences={"t": 7})
    assert runtime.route_info("t").route == NO_ROUTE


@pytest.mark.parametrize("dense", [False, True], ids=["compact", "dense"])
def test_preemption_recompute_keeps_route_and_counts_once(dense):
    memory, prompts = make_memoir()
    g = torch.Generator().manual_seed(2)
    seqs = {"r0": torch.cat([prompts[1], torch.randn(3, I, generator=g)])}
    plens = {"r0": 8}
    runtime = MemoryRuntime(memory, dense=dense)
    # preempted mid-prefill (after 5 of 8 prompt tokens), recomputed from 0, then decodes; then
    # preempted again after the route was decided and recomputed as one 10-token "prefill".
    steps = [[("r0", 0, 5)], [("r0", 0, 3)], [("r0", 3, 5)], [("r0", 8, 1)], [("r0", 0, 10)], [("r0", 10, 1)]]
    got = run_schedule(runtime, seqs, plens, steps)
    check(memory, runtime, seqs, plens, got)
    assert runtime.route_info("r0").route == 1
    assert runtime.recomputes == 3  # [0,3) and [3,8) re-run positions 0-4; [0,10) re-runs all


def test_gap_in_prompt_serves_base_and_free_prune():
    memory, prompts = make_memoir()
    runtime = MemoryRuntime(memory)
    seqs = {"r0-abcdefgh": prompts[0], "r1": prompts[1]}
    plens = {"r0-abcdefgh": 5, "r1": 8}
    # r0 starts at position 2 (as after a prefix-cache hit): its statistics are incomplete
    got = run_schedule(runtime, seqs, plens, [[("r0-abcdefgh", 2, 3), ("r1", 0, 8)]])
    assert runtime.route_info("r0-abcdefgh").route == NO_ROUTE
    assert all(row.abs().max() == 0 for row in got["r0-abcdefgh"].values())
    assert runtime.route_info("r1").route == 1
    runtime.free("r0-abcdefgh")
    runtime.prune({"r2"})
    assert runtime.states == {}
    # finished routes stay queryable, also by the caller's id (vLLM adds "-" + 8 characters)
    assert runtime.route_info("r0").route == NO_ROUTE and runtime.route_info("r1").route == 1
    assert external_id("cmpl-7-0a1b2c3d") == "cmpl-7" and external_id("r1") == "r1"


def forced(*routes):
    return [RequestOptions.parse({} if r is None else {"memserve_route": r}, slots=100) for r in routes]


@pytest.mark.parametrize("stored_reading", [False, True], ids=["own-context", "stored-reading"])
def test_forced_route_reads_the_memory_as_if_routed_there(stored_reading):
    """A forced route reads what a request routed there reads (`reading`): its own prompt mean, or
    the forced edit's stored reading."""
    memory, prompts = make_memoir(stored_reading=stored_reading)
    runtime = MemoryRuntime(memory)
    a = torch.cat([prompts[0], prompts[0]])
    plan = BatchPlan(["base", "edit2"], np.array([0, 5, 10]), np.array([0, 0]), np.array([5, 5]), forced(-1, 2))
    runtime.begin_step(plan)
    out = runtime.apply(torch.zeros(10, H), a)
    assert out[:5].abs().max() == 0  # routed to edit 0 by its prompt, but forced to the base model
    token_routes = torch.full((5,), NO_ROUTE)
    token_routes[4] = 2
    context, last_input = memory.reading(2, prompts[0].mean(0))
    assert (last_input is not None) == stored_reading
    if stored_reading:
        assert not torch.equal(context, prompts[0].mean(0))
    read = prompts[0].clone()
    read[4] = read[4] if last_input is None else last_input
    torch.testing.assert_close(out[5:], memory.delta(read, token_routes, context.expand(5, -1)))
    assert runtime.route_info("base").route == -1 and runtime.route_info("edit2").route == 2


def test_forced_and_natural_routes_in_one_batch_get_what_they_get_alone():
    """A forced route never changes a naturally routed neighbour's memory input (its context)."""
    memory, prompts = make_memoir()
    seqs = {"natural": prompts[1], "forced": prompts[2], "plain": prompts[0]}
    plens = {rid: seq.shape[0] for rid, seq in seqs.items()}
    options = {"natural": None, "forced": 0, "plain": None}

    def serve(rids):
        runtime = MemoryRuntime(memory)
        starts = np.cumsum([0] + [plens[r] for r in rids])
        runtime.begin_step(BatchPlan(rids, starts, np.zeros(len(rids), np.int64), np.array([plens[r] for r in rids]),
                                     forced(*(options[r] for r in rids))))
        out = runtime.apply(torch.zeros(int(starts[-1]), H), torch.cat([seqs[r] for r in rids]))
        return {r: out[starts[k] : starts[k + 1]] for k, r in enumerate(rids)}, runtime

    together, runtime = serve(list(seqs))
    assert runtime.route_info("natural").route == 1 and runtime.route_info("forced").route == 0
    for rid in seqs:
        alone, _ = serve([rid])
        torch.testing.assert_close(together[rid], alone[rid])  # up to batched float rounding
    assert together["natural"].abs().max() > 0


@pytest.mark.parametrize("value", ["3", 2.0, 1.5, -2, 10**30, [1], True, None, {"a": 1}, 7])
def test_hostile_route_options_are_refused_in_the_engine_never_raised(value):
    """Whatever a request carries, the engine serves it (without edits when its options are invalid)."""
    memory, prompts = make_memoir()
    runtime = MemoryRuntime(memory)
    extras = [{"memserve_route": value}, {"memserve_prompt_len": value}, {"memserve_rout": 1}, "not a dict"]
    options = [RequestOptions.parse(extra, runtime.memory_slots()) for extra in extras]
    assert all(o.problem for o in options[2:])
    n = len(extras)
    plan = BatchPlan([f"r{k}" for k in range(n)], np.arange(n + 1) * 5, np.zeros(n, np.int64), np.full(n, 5), options)
    runtime.begin_step(plan)
    out = runtime.apply(torch.zeros(5 * n, H), prompts[0].repeat(n, 1))
    for k, option in enumerate(options):
        if option.problem:
            assert runtime.route_info(f"r{k}").route == NO_ROUTE and out[5 * k : 5 * k + 5].abs().max() == 0
    assert runtime.refused_options == sum(1 for o in options if o.problem)
    assert options[0].problem  # 3 edits: no value of this list is a valid forced route...
    assert not RequestOptions.parse({"memserve_route": 2}, 3).problem  # ...but a slot is


def test_act_on_all_whole_prompt_chunk():
    """act_on="all": a prompt prefilled in one chunk gets the memory on every token (exact)."""
    memory, prompts = make_memoir()
    memory.config.act_on = "all"
    runtime = MemoryRuntime(memory)
    seq = prompts[2]
    runtime.begin_step(BatchPlan(["r"], np.array([0, seq.shape[0]]), np.array([0]), np.array([seq.shape[0]])))
    out = runtime.apply(torch.zeros(seq.shape[0], H), seq)
    context = seq.mean(0, keepdim=True).expand(seq.shape[0], -1)  # the request's prompt mean
    torch.testing.assert_close(out, memory.delta(seq, torch.full((seq.shape[0],), 2), context))
    assert runtime.inexact == 0
    runtime2 = MemoryRuntime(memory)
    run_schedule(runtime2, {"r": seq}, {"r": seq.shape[0]}, [[("r", 0, 4)], [("r", 4, seq.shape[0] - 4)]])
    assert runtime2.inexact == 1


def test_empty_memory_and_no_plan_are_identity():
    memory = MemoirMemory(MemoirConfig(top_k=16), torch.randn(H, I))
    runtime = MemoryRuntime(memory)
    out = torch.randn(3, H)
    runtime.begin_step(BatchPlan(["x"], np.array([0, 3]), np.array([0]), np.array([3])))
    assert runtime.apply(out, torch.randn(3, I)) is out
    full, _ = make_memoir()
    runtime = MemoryRuntime(full)
    assert runtime.apply(out, torch.randn(3, I)) is out  # dummy/profile run: no plan


@pytest.mark.parametrize("gate", ["paper", "default"])
def test_wise_memory_routes_like_reference(gate):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(H, I, generator=g)
    paper = dict(score="tokens", decentre=False, normalise=False)  # mean of token scores
    # A side memory set by hand below (the paper's consolidation keeps one)
    memory = WiseMemory(WiseConfig(**paper, consolidate="ties") if gate == "paper" else WiseConfig(consolidate="ties"), base)
    memory.calibrate(torch.randn(I, generator=g))
    side = base + 0.5 * torch.randn(H, I, generator=g)
    state = {k: v.clone() for k, v in memory.state_tensors().items()}
    state.update(side=side, side_min_score=torch.tensor(1.0), counters=torch.tensor([1, 1, 0]))
    memory.load_state(state, torch.zeros(0, I, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    # "b" scores ~0: tiny activations (paper), or exactly the background (decentred gain).
    quiet = 0.01 * torch.randn(6, I, generator=g) if gate == "paper" else memory.background.expand(6, I).clone()
    seqs = {"a": 3 * torch.randn(7, I, generator=g), "b": quiet}
    plens = {"a": 5, "b": 4}
    runtime = MemoryRuntime(memory)
    got = run_schedule(runtime, seqs, plens, [[("a", 0, 2), ("b", 0, 4)], [("a", 2, 3), ("b", 4, 1)],
                                               [("b", 5, 1), ("a", 5, 2)]])
    check(memory, runtime, seqs, plens, got)
    assert runtime.route_info("a").route == 0 and runtime.route_info("b").route == NO_ROUTE


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


def test_server_argv_defaults_and_overrides(tmp_path):
    import json

    from memserve.serving.server import build_argv

    argv = build_argv(tmp_path / "missing", "127.0.0.1", 8000)
    assert argv[argv.index("--dtype") + 1] == "float32" and "--enforce-eager" in argv
    assert "--no-enable-prefix-caching" not in argv  # caching stays on for every store
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert overrides["architectures"] == ["MemserveLlamaForCausalLM"]
    assert argv[argv.index("--served-model-name") + 1] == "SmolLM2-135M-Instruct"
    assert "--max-model-len" not in argv  # the model's own context length (8192 for the default model)
    argv = build_argv(None, "0.0.0.0", 9000, ["--dtype", "bfloat16", "--max-model-len", "512", "--api-key", "k"])
    assert "--enforce-eager" not in argv and argv.count("--dtype") == 1 and argv.count("--max-model-len") == 1


def test_serving_target_names_the_family_and_refuses_others(tmp_path, tiny_model_dir):
    import json
    import shutil

    from memserve.serving.plugin import ServingTarget, UnsupportedModel

    target = ServingTarget.resolve(None, tiny_model_dir)
    assert target.architecture == "LlamaForCausalLM" and target.hf_overrides() == {"architectures": ["MemserveLlamaForCausalLM"]}
    assert not target.acts_on_all and target.store is None
    other = tmp_path / "qwen"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": None, "model_type": "qwen2"}))
    assert ServingTarget.resolve(tmp_path / "store", other).hf_overrides() == {
        "architectures": ["MemserveQwen2ForCausalLM"], "memserve_store": str((tmp_path / "store").absolute())}
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel cannot carry a memserve memory"):
        ServingTarget.resolve(None, other)


def test_server_gives_the_model_worker_every_core_of_a_small_machine(monkeypatch):
    from memserve.serving import server

    assert server.worker_cpu_environment(2) == {server.RESERVED_CPU_ENV: "0"}
    assert server.worker_cpu_environment(64) == {}  # big machines: vLLM keeps a core for the scheduler
    monkeypatch.setattr(server.os, "sched_getaffinity", lambda pid: {0, 1})
    for user_value, served in (("1", "1"), (None, "0")):  # the user's choice wins
        environ = {k: v for k, v in server.os.environ.items() if k != server.RESERVED_CPU_ENV}
        if user_value is not None:
            environ[server.RESERVED_CPU_ENV] = user_value
        monkeypatch.setattr(server.os, "environ", environ)  # this test's copy: the others' is untouched
        server._prepare_environment()
        assert environ[server.RESERVED_CPU_ENV] == served


def test_block_hashes_are_private_from_the_routing_span_on():
    """vLLM's own request block hasher with the salting patch: two requests with the same tokens
    share the blocks that end at or before their salt position, and no block after it; a request
    without a salt position (a plain engine's) hashes exactly as vLLM does."""
    from types import SimpleNamespace

    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils

    from memserve.serving import prefix_cache

    prefix_cache.install()
    hasher = kv_cache_utils.get_request_block_hasher(16, sha256)
    kv_cache_utils.init_none_hash(sha256)
    chat = SimpleNamespace(routing_span=lambda prompt: (40, len(prompt)))  # a routing span from position 40 on
    tokens = list(range(100, 180))

    def hashes(request_id: str, salt: prefix_cache.PrefixSalt | None):
        request = SimpleNamespace(request_id=request_id, prompt_token_ids=tokens, all_token_ids=tokens,
                                  num_tokens=len(tokens), block_hashes=[], mm_features=None, lora_request=None,
                                  cache_salt=None, prompt_embeds=None, sampling_params=None)
        return (salt.wrap(hasher) if salt else hasher)(request)

    salt = prefix_cache.PrefixSalt(chat, acts_on_all=False)
    a, b = hashes("a", salt), hashes("b", salt)
    assert len(a) == 5 and a[:2] == b[:2] and all(x != y for x, y in zip(a[2:], b[2:]))  # blocks end 16, 32 | 48..
    assert hashes("a", None) == hashes("b", None)  # unsalted: vLLM's hashes
    assert hashes("a", None)[:2] == a[:2]
    everything = prefix_cache.PrefixSalt(None, acts_on_all=True)  # the memory acts on prompt tokens too
    assert all(x != y for x, y in zip(hashes("a", everything), hashes("b", everything)))
    # memserve_prompt_len routes on a shorter prompt: the span is found in it
    seen = []
    short = prefix_cache.PrefixSalt(SimpleNamespace(routing_span=lambda p: (seen.append(len(p)) or 0, len(p))), False)
    assert short.salt_from(tokens, {"memserve_prompt_len": 30}) == 0 and seen == [30]
    assert short.salt_from(tokens, {"memserve_prompt_len": "x"}) == 0 and seen[-1] == len(tokens)


def test_anchored_edit_is_reached_only_when_the_span_tokens_name_its_subject():
    """The runtime reads each new request's routing-span token ids once (`BatchPlan.route_tokens`):
    the same prompt activations reach an anchored edit only when those tokens name its subject."""
    memory, prompts = make_memoir(num_edits=1)
    memory.load_anchors([([[11, 12]], False, False)])
    runtime = MemoryRuntime(memory)
    seq = torch.cat([prompts[0], torch.randn(2, I)])
    plen = prompts[0].shape[0]
    for rid, tokens in (("named", [3, 11, 12, 4, 5]), ("unnamed", [3, 11, 4, 12, 5]), ("unknown", None)):
        runtime.begin_step(BatchPlan([rid], np.array([0, seq.shape[0]]), np.array([0]), np.array([plen]),
                                     route_spans=np.array([(0, plen)]), route_tokens=[tokens]))
        out = runtime.apply(torch.zeros(seq.shape[0], H), seq)
        runtime.end_step()
        routed = rid == "named"
        assert runtime.route_info(rid).route == (0 if routed else NO_ROUTE), rid
        assert bool(out[plen - 1 :].abs().sum() > 0) == routed and not out[: plen - 1].abs().sum()
