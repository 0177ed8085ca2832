"""Compiled mode (torch.compile + inductor, vLLM's CPU default): the memory runs inside the custom op
`memserve::memory_apply`, opaque to dynamo, so routing stays per request after the one-time trace.

A cold inductor compile takes 4-7 minutes on 2 cores (cached in ~/.cache/vllm/torch_compile_cache
afterwards; about 2.5 minutes warm). fp32 so outputs can be compared exactly with the
transformers reference.
"""

from __future__ import annotations

import gc
import os

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]

NUM_EDITS = int(os.environ.get("MEMSERVE_TEST_EDITS", "24"))
MAX_NEW = 12


@pytest.fixture(scope="module")
def setup():
    from memserve.editor import open_session
    from memserve.serving.testing import cached_store, test_facts

    store = cached_store(NUM_EDITS)
    facts = test_facts(NUM_EDITS)[:8]
    texts = [f.prompt for f in facts] + [f.rephrases[0] for f in facts] + ["Name three primary colors."]
    runner = open_session(store, create=False)
    try:
        ids = [runner.edited.encode(t) for t in texts]
        ref, routes = runner.edited.generate(ids, MAX_NEW)
    finally:
        runner.store.close()
        del runner
        gc.collect()
    return store, ids, ref, routes.tolist()


def test_compiled_fp32_matches_reference(setup):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from memserve.serving.offline import VllmEditedModel

    store, ids, ref, ref_routes = setup
    model = VllmEditedModel(store, enforce_eager=False)
    try:
        out, routes = model.generate(ids, MAX_NEW)
        assert routes == ref_routes
        assert out == ref
        assert any(r >= 0 for r in routes)
    finally:
        del model
        gc.collect()
