"""The fast trainer against the naive full-model loop, and sequential editing on a tiny model."""

import dataclasses

import pytest
import torch

from memserve.editor import load_reference, open_session
from memserve.evaluate import HFBackend, Scored, evaluate
from memserve.facts import Fact
from memserve.training import (CandidateHead, FastStepper, NaiveStepper, capture, capture_rows, edit_batch, key_rows_loss,
                               length_groups, low_precision_copy, prepare, stopping_loss)

from .conftest import FACTS, tiny_config

FACT_OBJECTS = [Fact(f["prompt"], f["target"], tuple(f["rephrases"]), tuple((l["prompt"], l["answer"]) for l in f["locality"])) for f in FACTS]


@pytest.mark.parametrize("method, extra", [
    ("memoir", {"prompt_context": False}), ("memoir", {"prompt_context": True}), ("memoir", {"act_on": "all"}), ("wise", {}),
])
def test_fast_step_matches_naive_step(tmp_path, tiny_model_dir, method, extra):
    runner = open_session(tmp_path / "s", tiny_model_dir, method=method, config=tiny_config(method, **extra))
    edited = runner.edited
    batch = edit_batch(edited, FACT_OBJECTS[0], runner.prefixes, ("Something unrelated.", ""))
    prepared = prepare(edited, batch)
    session = edited.memory.start_edit(prepared.examples)
    with torch.no_grad():
        for p in session.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = FastStepper(edited, prepared).target_logits(session)
    naive = NaiveStepper(edited, prepared).target_logits(session)
    assert fast.shape == naive.shape == (len(prepared.target_ids), edited.model.config.vocab_size)
    assert torch.allclose(fast, naive, atol=1e-4)
    g_fast = torch.autograd.grad(fast.logsumexp(-1).sum(), session.parameters())[0]
    g_naive = torch.autograd.grad(naive.logsumexp(-1).sum(), session.parameters())[0]
    assert torch.allclose(g_fast, g_naive, atol=1e-4, rtol=1e-3)


def assert_capture_is_one_padded_batch(edited, batch, atol):
    """Every real token's captured inputs (`capture_rows`) equal those of one padded full-model run."""
    ids, _, _, _ = edited.pad(batch.sequences, batch.prompt_lens)
    got = capture_rows(edited, batch, list(range(len(batch.sequences))))
    want = capture(edited, ids, upper_inputs=True)
    got, want = [got[0], got[1], *got[2]], [want[0], want[1], *want[2]]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for row, seq in enumerate(batch.sequences):
            g_row, w_row = g[row, : len(seq)], w[row, : len(seq)]
            scale = w_row.abs().amax(-1, keepdim=True)  # per token: one position's states can be 1000x another's
            assert ((g_row - w_row).abs() <= atol * scale).all(), row


@pytest.mark.parametrize("fast", [True, False])
def test_rows_are_captured_as_one_padded_batch_would_be(tmp_path, tiny_model_dir, fast, monkeypatch):
    """Rows run in length groups (the chat-turn row carries the system prompt) and, for Llama-family
    models, only after their recurring tokens (template, prefix), whose states are computed once per
    model; every real token's captured inputs equal those of the one padded batch it replaces."""
    assert length_groups({0: 13, 1: 45, 2: 19, 3: 18, 4: 21}) == [[0, 3, 2, 4], [1]]
    if not fast:
        monkeypatch.setattr(FastStepper, "supports", classmethod(lambda cls, edited: False))
    runner = open_session(tmp_path / "s", tiny_model_dir, config=tiny_config())
    edited = runner.edited
    batch = edit_batch(edited, FACT_OBJECTS[0], runner.prefixes, [])
    chat_start = edited.chat.routing_span(batch.sequences[1][: batch.prompt_lens[1]])[0]
    openings = [len(edited.encode(f"{prefix}.")) for prefix in runner.prefixes]
    assert batch.recurring == (0, chat_start, *openings) and chat_start > 20
    assert_capture_is_one_padded_batch(edited, batch, atol=1e-5)
    assert len(edited.prefix_states) == (1 + len(set(runner.prefixes)) if fast else 0)
    cached = dict(edited.prefix_states)
    assert_capture_is_one_padded_batch(edited, edit_batch(edited, FACT_OBJECTS[1], runner.prefixes, []), atol=1e-5)
    assert all(edited.prefix_states[k] is v for k, v in cached.items()) and len(edited.prefix_states) == len(cached)


def test_training_prefixes_sets_the_rows_each_edit_trains_on(tmp_path, tiny_model_dir):
    """A store made with `training_prefixes=2` keeps the first two of the default five prefixes, and
    its edits train on the two key rows and those two prefixed prompts; an impossible count makes no store."""
    five = open_session(tmp_path / "five", tiny_model_dir, config=tiny_config()).prefixes
    runner = open_session(tmp_path / "two", tiny_model_dir, config=tiny_config(training_prefixes=2))
    assert len(five) == 5 and runner.prefixes == five[:2]
    batch = edit_batch(runner.edited, FACT_OBJECTS[0], runner.prefixes, [])
    assert batch.in_scope == [True] * 4 and batch.sequences[2][: len(runner.edited.encode(f"{five[0]}."))] == runner.edited.encode(f"{five[0]}.")
    with pytest.raises(ValueError, match="training_prefixes must be in 0..5, got 6"):
        open_session(tmp_path / "six", tiny_model_dir, config=tiny_config(training_prefixes=6))
    assert not (tmp_path / "six").exists()


@pytest.mark.parametrize("method, stop_loss", [("memoir", 0.02), ("memoir", 100.0), ("wise", 0.02)])
def test_an_edit_trains_once_and_keeps_where_it_ended(tmp_path, tiny_model_dir, monkeypatch, method, stop_loss):
    """All steps without reaching the stop loss (a random tiny model never does at 0.02) -> the edit is
    reported unconverged and keeps the values its one optimisation ended with (it does not start its
    columns over, which would erase earlier edits' share of them); a stop loss of 100 stops at once."""
    import memserve.training as training

    runner = open_session(tmp_path / "s", tiny_model_dir, method=method, config=tiny_config(method, steps=3, stop_loss=stop_loss))
    runner.apply(FACT_OBJECTS[:1])
    ended = []
    real = training.optimise
    monkeypatch.setattr(training, "optimise", lambda session, *args: (real(session, *args), ended.append(
        [p.detach().clone() for p in session.parameters()]))[0])
    outcome = training.train_edit(runner.edited, edit_batch(runner.edited, FACT_OBJECTS[1], runner.prefixes, []))
    assert len(ended) == 1 and outcome.converged is (stop_loss > 1)
    assert outcome.steps == (1 if stop_loss > 1 else 3)
    if method == "memoir":
        memory = runner.edited.memory
        assert torch.equal(memory.residual[:, memory.edit_columns[-1]], ended[0][0])


def test_sequential_memoir_edits_are_learned_and_routed(tmp_path, tiny_model_dir):
    # A random tiny model cannot make any token likely (its loss stays near ln(vocab)); only argmaxes
    # move. Without the end-of-answer token all three edits share, each learned argmax is a fact's own.
    runner = open_session(tmp_path / "s", tiny_model_dir, method="memoir",
                          config=tiny_config(steps=120, tau=0.9, stop_after_answer=False))
    report = runner.apply(FACT_OBJECTS)
    assert report.added == 3 and runner.store.num_edits == 3
    assert runner.apply(FACT_OBJECTS).skipped == 3  # resumable: nothing duplicated
    ids = [runner.store.find(f.key) for f in FACT_OBJECTS]
    assert ids == [0, 1, 2]
    result = evaluate(runner.edited, HFBackend(runner.edited), FACT_OBJECTS, ids, generation=False)
    assert result["routing"]["edit_prompt_to_own_edit"] == 1.0
    assert result["rel"] > 0.9  # a random tiny model can still memorise a few targets
    assert result["loc"] == 1.0 and result["routing"]["locality_to_no_edit"] == 1.0
    assert result["routing"]["locality_reaching_an_edit"] == []
    # A locality probe that is another fact's edit prompt reaches that edit: the report names both.
    probe = (FACT_OBJECTS[1].prompt, FACT_OBJECTS[1].target)
    crossed = [dataclasses.replace(f, source="facts.jsonl", line=n) for n, f in enumerate(FACT_OBJECTS, 1)]
    crossed[0] = dataclasses.replace(crossed[0], locality=(probe,))
    result = evaluate(runner.edited, HFBackend(runner.edited), crossed, ids, generation=False, chat=False)
    (reached,) = result["routing"]["locality_reaching_an_edit"]
    assert reached["fact"] == "facts.jsonl:1" and reached["prompt"] == probe[0]
    assert (reached["edit"], reached["edit_fact"]) == (1, "facts.jsonl:2") and result["routing"]["locality_to_no_edit"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("stop_after_answer", [True, False])
def test_key_answers_end_in_eos_only_when_asked(tmp_path, tiny_model_dir, stop_after_answer):
    runner = open_session(tmp_path / "s", tiny_model_dir, config=tiny_config(stop_after_answer=stop_after_answer))
    edited = runner.edited
    batch = edit_batch(edited, FACT_OBJECTS[0], runner.prefixes, ("Something unrelated.", ""))
    eos = edited.tokenizer.eos_token_id
    ends = [seq[-1] == eos for seq in batch.sequences]
    assert ends == [stop_after_answer and row in batch.key_rows for row in range(len(batch.sequences))]
    assert len(batch.key_rows) == 2  # the bare edit and its chat turn
    assert prepare(edited, batch).target_ids.tolist().count(eos) == (len(batch.key_rows) if stop_after_answer else 0)


def test_candidate_head_is_the_full_softmax_restricted_to_likely_tokens(tmp_path, tiny_model_dir):
    runner = open_session(tmp_path / "s", tiny_model_dir, config=tiny_config())
    edited = runner.edited
    prepared = prepare(edited, edit_batch(edited, FACT_OBJECTS[0], runner.prefixes, ("Something unrelated.", "")))
    states = FastStepper(edited, prepared).target_states(edited.memory.start_edit(prepared.examples))
    head = CandidateHead(edited.model.lm_head, prepared.target_ids, per_position=5)
    assert head.vocab.tolist() == sorted(set(prepared.target_ids.tolist()))
    exact = head.exact_losses(states)
    full_logits = edited.model.lm_head(states).float()
    assert torch.allclose(exact, torch.nn.functional.cross_entropy(full_logits, prepared.target_ids, reduction="none"))
    likely = set(full_logits.topk(5, dim=-1).indices.flatten().tolist())
    assert set(head.vocab.tolist()) == likely | set(prepared.target_ids.tolist())
    assert (head.losses(states) <= exact + 1e-6).all()  # fewer tokens in the softmax: restricted losses are lower
    assert head.losses(states).sum() < exact.sum()
    everything = CandidateHead(edited.model.lm_head, prepared.target_ids, per_position=full_logits.shape[-1])
    everything.exact_losses(states)
    assert torch.allclose(everything.losses(states), exact, atol=1e-5)
    widened = CandidateHead(edited.model.lm_head, prepared.target_ids, per_position=5)
    widened.widen(states)  # the same tokens, without a differentiable full softmax
    assert widened.vocab.tolist() == head.vocab.tolist()


def test_low_precision_steps_approximate_the_model_precision_ones(tmp_path, tiny_model_dir):
    runner = open_session(tmp_path / "s", tiny_model_dir, config=tiny_config())
    edited = runner.edited
    prepared = prepare(edited, edit_batch(edited, FACT_OBJECTS[0], runner.prefixes, ("Something unrelated.", "")))
    session = edited.memory.start_edit(prepared.examples)
    exact = FastStepper(edited, prepared).target_states(session)
    stepper = FastStepper(edited, prepared, low_precision_copy(edited, torch.bfloat16))
    assert torch.equal(stepper.target_states(session), exact)  # exact=True: the model's own precision
    approx = stepper.target_states(session, exact=False)
    assert approx.dtype == exact.dtype and not torch.equal(approx, exact)
    assert torch.allclose(approx, exact, rtol=0.05, atol=0.05)
    assert all(p.dtype == torch.float32 for p in edited.model.parameters())  # the model itself is untouched


def test_an_edit_with_low_precision_steps_stops_on_its_loss_in_model_precision(tmp_path, tiny_model_dir, monkeypatch):
    """bf16 steps may only end an edit whose loss, recomputed by the full fp32 model, is at the stop loss
    (a random tiny model stays near ln(vocab) ~ 10.8: the stop loss is set where it can get)."""
    import memserve.training as training

    checked = []
    real = training.optimise

    def optimise(session, stepper, head, prepared, key_rows, cfg):
        loss, steps, converged = real(session, stepper, head, prepared, key_rows, cfg)
        assert stepper.low_precision.dtype == torch.bfloat16
        if converged and steps > 1:
            with torch.no_grad():
                logits = NaiveStepper(stepper.edited, prepared).target_logits(session).float()
            losses = torch.nn.functional.cross_entropy(logits, prepared.target_ids, reduction="none")
            checked.append(stopping_loss(losses, prepared.target_rows, key_rows))
            assert checked[-1] <= cfg.stop_loss * 1.001
        return loss, steps, converged

    monkeypatch.setattr(training, "optimise", optimise)
    runner = open_session(tmp_path / "s", tiny_model_dir, config=tiny_config(step_dtype="bfloat16", steps=120, stop_loss=10.0))
    runner.apply(FACT_OBJECTS[:2])
    assert len(checked) == 2
    assert [r["step_dtype"] for r in runner.store.records()] == ["bfloat16", "bfloat16"]  # what the edits ran in
    with pytest.raises(ValueError, match="step_dtype must be auto, float32 or bfloat16, got 'fp8'"):
        open_session(tmp_path / "bad", tiny_model_dir, config=tiny_config(step_dtype="fp8"))


def test_key_rows_count_again_and_each_must_reach_the_stop_loss():
    # Rows 0 and 1 are the key rows (as written, as a chat turn); rows 2-3 prefixed copies of row 0.
    losses = torch.tensor([0.0, 0.0, 0.12, 0.12, 0.0, 0.0, 0.0, 0.0])
    rows = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert stopping_loss(losses, rows, ()) == pytest.approx(0.03)  # the mean alone would stop at 0.03
    assert stopping_loss(losses, rows, (0, 1)) == pytest.approx(0.12)  # the chat row is still at 0.12
    assert float(key_rows_loss(losses, rows, (0, 1))) == pytest.approx(0.06)
    assert stopping_loss(torch.full((8,), 0.01), rows, (0, 1)) == pytest.approx(0.01)


@pytest.mark.parametrize("key_row_loss", [False, True])
def test_an_edit_stops_only_when_its_key_rows_are_learned(tmp_path, tiny_model_dir, key_row_loss, monkeypatch):
    import memserve.training as training

    seen = []
    real = training.stopping_loss
    monkeypatch.setattr(training, "stopping_loss", lambda losses, rows, key_rows: seen.append(key_rows) or real(losses, rows, key_rows))
    runner = open_session(tmp_path / "s", tiny_model_dir, config=tiny_config(key_row_loss=key_row_loss, steps=2))
    runner.apply(FACT_OBJECTS[:1])
    assert seen and set(seen) == {(0, 1) if key_row_loss else ()}


def _last_prompt_delta(edited, prompt: str) -> tuple[torch.Tensor, int]:
    """The memory's output at the last token of `prompt` (asked as written) and the route it took."""
    ids = edited.encode(prompt)
    outputs = []
    handle = edited.proj.register_forward_hook(lambda _module, _args, out: outputs.append(out[0, -1]))
    try:
        _, routes = edited.logits([ids], [len(ids)])
        edited.logits([ids], [len(ids)], use_memory=False)
    finally:
        handle.remove()
    return outputs[0] - outputs[1], int(routes[0])


@pytest.mark.parametrize("stored_reading", [True, False], ids=["stored-reading", "own-reading"])
def test_a_rephrase_routed_to_an_edit_reads_the_memory_as_the_edit_prompt_did(tmp_path, tiny_model_dir, stored_reading):
    """With stored readings every request routed to an edit gets, at its last prompt token, the output
    the edit's own prompt gets (what training taught), whatever its wording; also after a reload.
    Without, the output follows the request's own activations."""
    runner = open_session(tmp_path / "s", tiny_model_dir, method="memoir",
                          config=tiny_config(tau=0.0, stored_reading=stored_reading))  # tau 0: both prompts reach the edit
    runner.apply(FACT_OBJECTS[:1])
    fact, memory = FACT_OBJECTS[0], runner.edited.memory
    assert len(memory.edit_readings) == int(stored_reading)
    if stored_reading:
        assert memory.edit_readings[0].shape == (int((memory.key_owner == 0).sum()), 2, 32)
    own, own_route = _last_prompt_delta(runner.edited, fact.prompt)
    other, other_route = _last_prompt_delta(runner.edited, fact.rephrases[0])
    runner.store.close()
    assert own_route == other_route == 0 and own.abs().max() > 0
    assert torch.allclose(own, other, atol=1e-5) == stored_reading
    reloaded, _ = _last_prompt_delta(load_reference(tmp_path / "s"), fact.rephrases[0])
    torch.testing.assert_close(reloaded, other)


class _Predicting:
    """A backend that predicts `token` at every answer position (and routes nothing)."""

    name = "predicting"

    def __init__(self, token: int):
        self.token = token

    def score(self, sequences, prompt_lens, use_memory=True):
        return [Scored([self.token] * (len(s) - n), [0.0] * (len(s) - n), -1) for s, n in zip(sequences, prompt_lens)]


def test_answers_cut_short_by_the_end_of_sequence_token_are_counted(tmp_path, tiny_model_dir):
    edited = open_session(tmp_path / "s", tiny_model_dir, config=tiny_config()).edited
    eos = edited.tokenizer.eos_token_id
    ids = [None] * len(FACT_OBJECTS)
    ended = evaluate(edited, _Predicting(eos), FACT_OBJECTS, ids, generation=False, chat=False)
    assert ended["rel_ended_early"] == 1.0 and ended["rel"] == 0.0
    other = evaluate(edited, _Predicting(eos + 1), FACT_OBJECTS, ids, generation=False, chat=False)
    assert other["rel_ended_early"] == 0.0
