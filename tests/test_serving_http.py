"""`memserve.serving.serve` end to end: the OpenAI client against the HTTP server (the session's shared one).

Checks completions and chat completions (the model's own chat template: routed on the user message,
see `memserve.chat`), streaming and not, each equal to the transformers reference, and the route
report (`memserve` field, `x-memserve-edit` header, `GET /v1/memserve/routes/{id}`).
"""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]

NUM_EDITS = int(os.environ.get("MEMSERVE_TEST_EDITS", "24"))
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def store():
    from memserve.serving.testing import cached_store

    return cached_store(NUM_EDITS)


UNRELATED_CHAT = "Name three primary colors."


@pytest.fixture(scope="module")
def references(store):
    """An edited fact whose reference (transformers) answers, as a plain prompt and as a chat turn,
    contain its target; those answers; and the unedited chat answer to an unrelated question.

    Edit quality is the core's business; the server must reproduce the reference answers exactly."""
    import gc

    from memserve.editor import open_session
    from memserve.serving.testing import test_facts

    runner = open_session(store, create=False)
    try:
        edited = runner.edited
        facts = test_facts(NUM_EDITS)[:10]
        plain, plain_routes = edited.generate([edited.encode(f.prompt) for f in facts], MAX_TOKENS)
        chat, chat_routes = edited.generate([edited.chat.format(f.prompt) for f in facts], MAX_TOKENS)
        unrelated, _ = edited.generate([edited.chat.format(UNRELATED_CHAT)], MAX_TOKENS, use_memory=False)
        decode = edited.tokenizer.decode
        for f, p, pr, c, cr in zip(facts, plain, plain_routes.tolist(), chat, chat_routes.tolist()):
            if pr >= 0 and cr == pr and f.target in decode(p) and f.target in decode(c):
                return f, decode(p), decode(c), decode(unrelated[0])
        pytest.fail("none of the first 10 edits answers its target in the reference path, plain and chat")
    finally:
        runner.store.close()
        del runner
        gc.collect()


@pytest.fixture(scope="module")
def server(edited_server):
    """The session's shared server (tests/conftest.py), which serves a copy of the same store."""
    return edited_server


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base + "/v1", api_key=server.api_key)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


def test_models_and_health(client, model_name):
    assert model_name == "SmolLM2-135M-Instruct"


def test_completion_edited_and_reported(client, model_name, references):
    fact, reference, _, _ = references
    raw = client.completions.with_raw_response.create(
        model=model_name, prompt=fact.prompt, max_tokens=MAX_TOKENS, temperature=0,
    )
    resp = raw.parse()
    assert resp.choices[0].text == reference and fact.target in reference
    edit = raw.headers["x-memserve-edit"]
    assert edit.startswith("edit-")
    body = resp.model_extra["memserve"]
    assert body[0]["edit"] == edit and body[0]["route"] >= 0 and body[0]["score"] >= 0.5


def test_completion_unrelated_prompt_not_routed(client, model_name):
    raw = client.completions.with_raw_response.create(
        model=model_name, prompt="Name three primary colors.", max_tokens=MAX_TOKENS, temperature=0,
    )
    assert raw.headers["x-memserve-edit"] == "none"


def test_completion_streaming_equals_non_streaming(client, model_name, references, server):
    fact = references[0]
    full = client.completions.create(model=model_name, prompt=fact.prompt, max_tokens=MAX_TOKENS, temperature=0)
    stream = client.completions.create(
        model=model_name, prompt=fact.prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert server.request("GET", f"/v1/memserve/routes/{chunks[0].id}")[1]["memserve"][0]["edit"].startswith("edit-")


def chat(client, model_name, prompt, stream=False):
    return client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0,
        stream=stream,
    )


def test_chat_gets_edit_through_the_default_template(client, model_name, references, server):
    """Non-streaming and streaming chat answer like the reference chat turn, i.e. with the edit."""
    fact, _, reference, _ = references
    resp = chat(client, model_name, fact.prompt)
    assert resp.choices[0].message.content == reference and fact.target in reference
    assert resp.model_extra["memserve"][0]["edit"].startswith("edit-")
    chunks = list(chat(client, model_name, fact.prompt, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference
    assert server.request("GET", f"/v1/memserve/routes/{chunks[0].id}")[1]["memserve"][0]["edit"].startswith("edit-")


def test_chat_unrelated_question_answers_like_the_base_model(client, model_name, references):
    resp = chat(client, model_name, UNRELATED_CHAT)
    assert resp.model_extra["memserve"][0]["edit"] == "none"
    assert resp.choices[0].message.content == references[3]
