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
    assert client.models.list().data[0].model_extra["max_model_len"] == 8192  # the model's own length


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


HOSTILE = ["3", 2.5, -7, 10**30, [1], True, None]


@pytest.mark.parametrize("option", ["memserve_route", "memserve_prompt_len"])
def test_hostile_options_are_refused_with_400_and_the_server_keeps_serving(client, model_name, references, option):
    """Every hostile value of both options, on both endpoints, through the official client: HTTP 400
    naming the field. The same values once used to reach `int()` or an out-of-range route inside the
    engine's forward, which stops the engine for every client."""
    import openai

    fact, reference, chat_reference, _ = references
    values = HOSTILE + ([999, 10**6] if option == "memserve_route" else [0, 2**40])
    for value in values:
        with pytest.raises(openai.BadRequestError, match=f"vllm_xargs.{option}"):
            client.completions.create(model=model_name, prompt=fact.prompt, max_tokens=2,
                                      extra_body={"vllm_xargs": {option: value}})
        with pytest.raises(openai.BadRequestError, match=f"vllm_xargs.{option}"):
            client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           extra_body={"vllm_xargs": {option: value}})
    for extra in ({"memserve_rout": 1}, {"memserve_report": "mine"}):  # unknown / server-only option
        with pytest.raises(openai.BadRequestError, match="is not a memserve option"):
            client.completions.create(model=model_name, prompt=fact.prompt, max_tokens=2, extra_body={"vllm_xargs": extra})
    # valid forced routes still work: the base model, and the edit the fact routes to
    base = client.completions.create(model=model_name, prompt=fact.prompt, max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"vllm_xargs": {"memserve_route": -1}})
    assert base.model_extra["memserve"][0]["edit"] == "none"
    resp = client.completions.create(model=model_name, prompt=fact.prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert resp.choices[0].text == reference
    assert chat(client, model_name, fact.prompt).choices[0].message.content == chat_reference


def test_hostile_options_on_other_endpoints_are_refused(server, model_name):
    """Every POST body carrying `vllm_xargs` is checked, whatever the endpoint (responses, messages...)."""
    for path in ("/v1/responses", "/v1/messages", "/v1/completions"):
        code, body = server.request("POST", path, body={"model": model_name, "input": "hi", "prompt": "hi",
                                                         "vllm_xargs": {"memserve_route": "x"}})
        assert code == 400 and "vllm_xargs.memserve_route" in body["error"]["message"], (path, code, body)


def test_route_report_for_several_prompts_and_samples(client, model_name, references, server):
    """n > 1 and several prompts: choice i * n + k is prompt i's sample k, each with its own route."""
    fact = references[0]
    resp = client.completions.create(model=model_name, prompt=[fact.prompt, UNRELATED_CHAT], n=2, max_tokens=4,
                                     temperature=1.0, seed=0)  # n > 1 needs sampling; routes come from the prompt
    report = sorted(resp.model_extra["memserve"], key=lambda r: r["index"])
    assert [r["index"] for r in report] == [0, 1, 2, 3]
    assert [r["edit"].startswith("edit-") for r in report] == [True, True, False, False], report
    assert report[2]["edit"] == report[3]["edit"] == "none"
    chat_resp = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": fact.prompt}],
                                               n=2, max_tokens=4, temperature=1.0, seed=0)
    assert [r["edit"] for r in chat_resp.model_extra["memserve"]] == [report[0]["edit"]] * 2
    # a stream's report: by the x-memserve-request tag (or the response id)
    raw = client.completions.with_raw_response.create(model=model_name, prompt=[UNRELATED_CHAT, fact.prompt], n=2,
                                                      max_tokens=4, temperature=1.0, seed=0, stream=True)
    tag = raw.headers["x-memserve-request"]
    chunks = list(raw.parse())
    for key in (tag, chunks[0].id):
        streamed = server.request("GET", f"/v1/memserve/routes/{key}")[1]["memserve"]
        assert [r["edit"] for r in streamed] == ["none", "none", report[0]["edit"], report[0]["edit"]], (key, streamed)


def test_unknown_routes_are_reported_as_unknown_and_reused_ids_never_leak(client, model_name, references, server):
    """Two clients sending the same request id at once each get their own route; the ambiguous id
    answers "unknown" (never the other client's route), as does an id nobody sent."""
    from concurrent.futures import ThreadPoolExecutor

    fact = references[0]
    unknown = server.request("GET", "/v1/memserve/routes/cmpl-nobody-sent-this")[1]["memserve"]
    assert unknown == [{"index": 0, "edit": "unknown", "route": None, "score": None, "version": None}]

    def ask(prompt):
        return client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0,
                                         extra_headers={"X-Request-Id": "shared-id"})

    for _ in range(3):
        with ThreadPoolExecutor(2) as pool:
            edited, plain = pool.map(ask, [fact.prompt, UNRELATED_CHAT])
        assert edited.model_extra["memserve"][0]["edit"].startswith("edit-")
        assert plain.model_extra["memserve"][0]["edit"] == "none"
    assert edited.id == plain.id == "cmpl-shared-id"
    ambiguous = server.request("GET", "/v1/memserve/routes/cmpl-shared-id")[1]["memserve"]
    assert [r["edit"] for r in ambiguous] == ["unknown"]


def test_route_endpoint_explains_what_chat_requests_get(client, model_name, references, server):
    """`POST /v1/memserve/route` runs the served routing without generating: the same edit a chat
    completion of the question gets, as the nearest slot above its threshold; bad bodies get a 400."""
    fact = references[0]
    messages = [{"role": "user", "content": fact.prompt}]
    served = client.chat.completions.with_raw_response.create(model=model_name, messages=messages, max_tokens=2, temperature=0)
    status, body = server.request("POST", "/v1/memserve/route", body={"messages": messages, "top": 3}, check=False)
    assert status == 200, body
    assert body["edit"] == served.headers["x-memserve-edit"] != "none"
    nearest = body["explanation"]["candidates"]
    assert len(nearest) == 3 and nearest[0]["edit"] == body["edit"] and nearest[0]["passes"]
    assert nearest[0]["score"] >= nearest[1]["score"] and body["explanation"]["route"] == body["route"]
    status, body = server.request("POST", "/v1/memserve/route", body={"messages": [{"role": "user", "content": UNRELATED_CHAT}]},
                                  check=False)
    assert status == 200 and body["edit"] == "none" and not any(c["passes"] for c in body["explanation"]["candidates"])
    for bad, field in (({"prompt": 3}, "prompt"), ({"prompt": "x", "top": 0}, "top"), ({}, "exactly one"),
                       ({"messages": [{"role": "user"}]}, "messages")):
        status, body = server.request("POST", "/v1/memserve/route", body=bad, check=False)
        assert status == 400 and field in body["error"]["message"], (bad, body)


def test_metrics_carry_memserve_series_after_real_requests(client, model_name, references, server):
    import re
    import urllib.request

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(server.base + "/metrics") as response:
            text = response.read().decode()
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(memserve_\S+) (\S+)$", text, re.M)}

    before = scrape()
    fact = references[0]
    routed = client.completions.with_raw_response.create(model=model_name, prompt=fact.prompt, max_tokens=2, temperature=0)
    edit = routed.headers["x-memserve-edit"]
    client.completions.create(model=model_name, prompt="Name three primary colors.", max_tokens=2, temperature=0)
    after = scrape()
    assert after["memserve_requests_routed_total"] >= before.get("memserve_requests_routed_total", 0) + 1
    assert after["memserve_requests_unrouted_total"] >= before.get("memserve_requests_unrouted_total", 0) + 1
    hits = f'memserve_edit_hits_total{{edit="{edit}"}}'
    assert after[hits] >= before.get(hits, 0) + 1
    status = server.request("GET", "/v1/memserve/status")[1]
    assert after["memserve_store_edits"] == status["edits"] and after["memserve_store_version"] == status["version"]
    assert after["memserve_routing_seconds_total"] > 0 and after["memserve_engine_steps_total"] > 0
    assert "memserve_reloads_total" in after and "memserve_reload_refusals_total" in after
