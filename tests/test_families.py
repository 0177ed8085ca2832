"""Every supported model family end to end on a tiny random checkpoint written here with transformers
(the real tokenizer, no download): edit two facts, then serve the store through a vLLM engine and
check it answers exactly as the transformers reference, routes included, and that forcing the route
(none, or an edit) does what the natural route does."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from .conftest import FACTS, tiny_config

pytestmark = pytest.mark.vllm

from memserve.serving.testing import TINY_FAMILIES as FAMILIES
from memserve.serving.testing import tiny_checkpoint

UNRELATED = ("Name three primary colors.", "red, green and blue")


def test_every_supported_family_is_covered():
    from memserve.serving.model import SUPPORTED_ARCHITECTURES

    assert set(FAMILIES) == set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("architecture", list(FAMILIES))
def test_family_serves_as_the_reference(architecture, tmp_path, default_model_dir):
    from transformers import AutoTokenizer

    from memserve.editor import load_reference, open_session
    from memserve.evaluate import HFBackend
    from memserve.facts import Fact
    from memserve.serving.options import PROMPT_LEN_ARG, ROUTE_ARG
    from memserve.training import prompt_and_answer

    model_dir = tmp_path / "model"
    tiny_checkpoint(model_dir, architecture, AutoTokenizer.from_pretrained(default_model_dir))
    runner = open_session(tmp_path / "store", model_dir, method="memoir", config=tiny_config(steps=8))
    runner.apply([Fact(f["prompt"], f["target"], rephrases=tuple(f["rephrases"])) for f in FACTS[:2]])
    runner.store.close()

    reference = load_reference(tmp_path / "store")
    pairs = [(f["prompt"], f["target"]) for f in FACTS[:2]] + [(FACTS[0]["rephrases"][0], FACTS[0]["target"]), UNRELATED]
    rows = [prompt_and_answer(reference, prompt, answer) for prompt, answer in pairs]
    seqs, plens = [r[0] for r in rows], [r[1] for r in rows]
    expected = HFBackend(reference).score(seqs, plens)
    base = HFBackend(reference).score(seqs, plens, use_memory=False)
    assert [row.route for row in expected[:2]] == [0, 1]  # each edit prompt reaches its own edit
    assert expected[3].route == -1

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import SamplingParams

    from memserve.serving.offline import VllmEditedModel

    engine = VllmEditedModel(tmp_path / "store", max_model_len=256)
    try:
        name = engine.llm.apply_model(lambda m: type(m).__name__)[0]
        assert name == "Memserve" + architecture
        served = engine.score(seqs, plens)
        assert [row.route for row in served] == [row.route for row in expected]
        for got, want in zip(served, expected):
            assert got.predicted == want.predicted
            assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-3)
        for got, want in zip(engine.score(seqs, plens, use_memory=False), base):
            assert got.route == -1 and got.predicted == want.predicted

        # Forcing edit 0 on its own prompt serves what the natural route serves; on the unrelated
        # prompt it applies the memory where the natural route applied none.
        params = [SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1,
                                 extra_args={PROMPT_LEN_ARG: plens[i], ROUTE_ARG: 0}) for i in (0, 3)]
        outs = engine.llm.generate([{"prompt_token_ids": seqs[i]} for i in (0, 3)], params, use_tqdm=False)
        forced = [[float(entry[seq[j]].logprob) for j, entry in enumerate(o.prompt_logprobs) if j >= plen]
                  for o, seq, plen in zip(outs, (seqs[0], seqs[3]), (plens[0], plens[3]))]
        assert torch.allclose(torch.tensor(forced[0]), torch.tensor(served[0].logprobs), atol=1e-5)
        assert not torch.allclose(torch.tensor(forced[1]), torch.tensor(served[3].logprobs), atol=1e-4)
    finally:
        del engine
        gc.collect()
