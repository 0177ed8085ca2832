"""`memserve.serving.serve` end to end: the OpenAI client against the HTTP server (one server per module).

Checks completions and chat completions, streaming and not, the route report (`memserve` field,
`x-memserve-edit` header, `GET /v1/memserve/routes/{id}`), and the chat-template finding: routing
uses the whole prompt, and the default SmolLM2 chat template (system prompt + role markers, ~30
tokens around a ~10-token question) pulls the prompt's mask overlap below tau, so a chat request
only hits an edit when it is formatted like the edited prompt (here: a per-request raw template).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]

NUM_EDITS = int(os.environ.get("MEMSERVE_TEST_EDITS", "24"))
RAW_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
MAX_TOKENS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store():
    from memserve.serving.testing import cached_store

    return cached_store(NUM_EDITS)


@pytest.fixture(scope="module")
def fact(store):
    """An edited fact whose reference (transformers) answer contains its target, with that answer.

    Edit quality is the core's business; the server must reproduce the reference answer exactly."""
    import gc

    from memserve.editor import open_session
    from memserve.serving.testing import test_facts

    runner = open_session(store, create=False)
    try:
        facts = test_facts(NUM_EDITS)[:10]
        outs, routes = runner.edited.generate([runner.edited.encode(f.prompt) for f in facts], MAX_TOKENS)
        for f, out, route in zip(facts, outs, routes.tolist()):
            text = runner.edited.tokenizer.decode(out)
            if route >= 0 and f.target in text:
                return f, text
        pytest.fail("none of the first 10 edits answers its target in the reference path")
    finally:
        runner.store.close()
        del runner
        gc.collect()


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    code = (
        "from memserve.serving import serve; import sys; "
        f"serve({str(store)!r}, port={port}, engine_args=['--trust-request-chat-template'])"
    )
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real server layout: API server + engine process
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.time() + 400
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}):\n{Path(log).read_text()[-4000:]}")
            try:
                if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server did not come up:\n{Path(log).read_text()[-4000:]}")
            time.sleep(2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="none")


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


def test_models_and_health(client, model_name):
    assert model_name == "SmolLM2-135M-Instruct"


def test_completion_edited_and_reported(client, model_name, fact):
    fact, reference = fact
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


def test_completion_streaming_equals_non_streaming(client, model_name, fact, server):
    fact, _ = fact
    import json
    import urllib.request

    full = client.completions.create(model=model_name, prompt=fact.prompt, max_tokens=MAX_TOKENS, temperature=0)
    stream = client.completions.create(
        model=model_name, prompt=fact.prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    with urllib.request.urlopen(f"{server}/v1/memserve/routes/{chunks[0].id}") as r:
        report = json.load(r)
    assert report["memserve"][0]["edit"].startswith("edit-")


def chat(client, model_name, prompt, stream=False, raw_template=False):
    extra = {"chat_template": RAW_TEMPLATE} if raw_template else None
    return client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0,
        stream=stream, extra_body=extra,
    )


def test_chat_with_edit_formatted_prompt_gets_edit(client, model_name, fact, server):
    """Non-streaming and streaming chat hit the edit when the template leaves the prompt as edited."""
    fact, reference = fact
    import json
    import urllib.request

    resp = chat(client, model_name, fact.prompt, raw_template=True)
    assert resp.choices[0].message.content == reference
    assert resp.model_extra["memserve"][0]["edit"].startswith("edit-")
    chunks = list(chat(client, model_name, fact.prompt, stream=True, raw_template=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == resp.choices[0].message.content
    with urllib.request.urlopen(f"{server}/v1/memserve/routes/{chunks[0].id}") as r:
        assert json.load(r)["memserve"][0]["edit"].startswith("edit-")


def test_chat_default_template_route_is_reported(client, model_name, fact):
    """The default template: record what happens (overlap below tau -> base answer, see module doc)."""
    fact, _ = fact
    resp = chat(client, model_name, fact.prompt)
    report = resp.model_extra["memserve"][0]
    print(f"default chat template: edit={report['edit']} overlap={report['score']:.2f} "
          f"answer={resp.choices[0].message.content!r}")
    assert report["edit"] == "none" or fact.target in resp.choices[0].message.content
