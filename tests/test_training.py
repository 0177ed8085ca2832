"""The fast trainer against the naive full-model loop, and sequential editing on a tiny model."""

import pytest
import torch

from memserve.editor import open_session
from memserve.evaluate import HFBackend, evaluate
from memserve.facts import Fact
from memserve.training import FastStepper, NaiveStepper, edit_batch, prepare

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


def test_sequential_memoir_edits_are_learned_and_routed(tmp_path, tiny_model_dir):
    runner = open_session(tmp_path / "s", tiny_model_dir, method="memoir", config=tiny_config(steps=120, tau=0.9))
    report = runner.apply(FACT_OBJECTS)
    assert report.added == 3 and runner.store.num_edits == 3
    assert runner.apply(FACT_OBJECTS).skipped == 3  # resumable: nothing duplicated
    ids = [runner.store.find(f.key) for f in FACT_OBJECTS]
    assert ids == [0, 1, 2]
    result = evaluate(runner.edited, HFBackend(runner.edited), FACT_OBJECTS, ids, generation=False)
    assert result["routing"]["edit_prompt_to_own_edit"] == 1.0
    assert result["rel"] > 0.9  # a random tiny model can still memorise a few targets
    assert result["loc"] == 1.0 and result["routing"]["locality_to_no_edit"] == 1.0
