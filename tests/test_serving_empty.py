"""A 0-edit store serves exactly like plain vLLM; a store for other weights is refused.

Engines are started one after another (never two at once), in-process, fp32 eager.
"""

from __future__ import annotations

import gc
import os

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]

PROMPTS = [
    "What is the capital of Kenya?",
    "Who wrote the novel Moby-Dick?",
    "Explain photosynthesis in one sentence.",
    "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n",
]
MAX_NEW = 16


@pytest.fixture(scope="module")
def empty_store():
    from memserve.serving.testing import cached_store

    return cached_store(0)


def greedy(llm, prompts):
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    ids = [{"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"]} for p in prompts]
    outs = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def plain_outputs():
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from memserve.models import prepare_default_model

    llm = LLM(model=str(prepare_default_model()), dtype="float32", enforce_eager=True, max_model_len=2048)
    try:
        return greedy(llm, PROMPTS)
    finally:
        del llm
        gc.collect()


def test_empty_store_serves_like_plain_vllm(empty_store, plain_outputs):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from memserve.serving.offline import VllmEditedModel

    model = VllmEditedModel(empty_store)
    try:
        assert model.kwargs["enable_prefix_caching"] is True
        # wrapped all the same, so edits committed later arrive by hot reload
        assert model.llm.apply_model(lambda m: (type(m).__name__, m.memserve_runtime.memory.num_edits))[0] == \
            ("MemserveLlamaForCausalLM", 0)
        assert greedy(model.llm, PROMPTS) == plain_outputs
        _, routes = model.generate([[1, 2, 3]], 2)
        assert routes == [-1]
    finally:
        del model
        gc.collect()


def test_store_for_other_weights_is_refused(empty_store, tmp_path):
    import shutil

    from memserve.store import Store

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from memserve.serving.offline import VllmEditedModel

    other = tmp_path / "other"
    shutil.copytree(empty_store, other)
    with Store.open(other) as store:
        store.update_manifest(weight_hash="0" * 32)
    with pytest.raises(Exception, match="weights"):
        VllmEditedModel(other)
    gc.collect()
