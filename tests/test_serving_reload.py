"""Hot reload and access control of the session's shared `memserve serve` (tests/conftest.py).

The server serves the symlink `edited_server.link` (first pointing at a copy of the 24-edit store);
tests commit edits to copies or in place, repoint the link and check what new and in-flight requests
are served. The module puts the original store back at the end, for the other serving tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]

NEW_FACT = ("What is the capital of Canada?", "Vancouver")
CLI_FACT = ("Who discovered penicillin?", "Marie Curie")
LONG = 64  # tokens of the in-flight request: it must outlive the reload


def point(server, target) -> None:
    """Repoint the served symlink atomically."""
    tmp = server.root / "store.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, server.link)


@pytest.fixture(scope="module")
def server(edited_server):
    original = os.readlink(edited_server.link)
    status = edited_server.request("GET", "/v1/memserve/status")[1]
    yield edited_server
    point(edited_server, original)
    code, after = edited_server.request("POST", "/v1/memserve/reload")
    assert code == 200 and after["version"] == status["version"] and after["edits"] == status["edits"], after


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base + "/v1", api_key=server.api_key)


def chat(client, prompt: str, max_tokens: int, stream: bool = False, min_tokens: int = 0):
    return client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=stream, extra_body={"min_tokens": min_tokens},
    )


def wait_for_version(server, version: int, seconds: float = 30) -> dict:
    deadline = time.time() + seconds
    while (status := server.request("GET", "/v1/memserve/status")[1])["version"] != version and time.time() < deadline:
        time.sleep(0.2)
    return status


def test_in_flight_request_keeps_its_memory_across_a_reload(server, client):
    """A long chat answer starts under version v0; the store is swapped for v0 + one edit and reloaded
    while it streams. The new edit answers at once (version v1); the running request ends exactly as
    the reference under v0 and reports v0."""
    from memserve.editor import open_session
    from memserve.facts import Fact
    from memserve.serving.testing import test_facts

    v0 = server.request("GET", "/v1/memserve/status")[1]
    v1_path = server.root / "v1"
    shutil.copytree(server.root / os.readlink(server.link), v1_path)
    runner = open_session(v1_path, create=False)
    try:
        edited = runner.edited
        questions = [f.prompt for f in test_facts(6)]
        # Edited answers end after the target (`stop_after_answer`): no EOS before LONG tokens here.
        out, routes = edited.generate([edited.chat.format(q) for q in questions], LONG, min_new_tokens=LONG)
        # the longest routed answer: the request that must still be running at the reload
        length, index = max((len(o), i) for i, (o, r) in enumerate(zip(out, routes.tolist())) if r >= 0)
        assert length >= LONG // 2, "no long routed reference answer to keep in flight"
        long_question, long_reference = questions[index], edited.tokenizer.decode(out[index], skip_special_tokens=True)
        runner.apply([Fact(prompt=NEW_FACT[0], target=NEW_FACT[1])])
        new_out, new_routes = edited.generate([edited.chat.format(NEW_FACT[0])], 10)
        new_reference = edited.tokenizer.decode(new_out[0])
    finally:
        runner.store.close()
    del runner, edited

    stream = chat(client, long_question, LONG, stream=True, min_tokens=LONG)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            break
    point(server, v1_path)
    code, reloaded = server.request("POST", "/v1/memserve/reload")
    assert code == 200 and reloaded["version"] > v0["version"] and reloaded["edits"] == v0["edits"] + 1, reloaded
    assert reloaded["pinned_memories"] == 1, reloaded  # the streaming request still holds v0's memory

    new = chat(client, NEW_FACT[0], 10)
    assert new.choices[0].message.content == new_reference and new_routes[0] >= 0
    assert new.model_extra["memserve"][0]["version"] == reloaded["version"]

    chunks += list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == long_reference
    report = server.request("GET", f"/v1/memserve/routes/{chunks[0].id}")[1]["memserve"][0]
    assert report["version"] == v0["version"] and report["route"] >= 0
    print(f"\nreload while a {LONG}-token answer streamed: v{v0['version']} -> v{reloaded['version']}; "
          f"new edit answers {new.choices[0].message.content!r}")


def test_memserve_edit_while_serving_is_picked_up_by_polling(server, client, tmp_path):
    """`memserve edit` on the served store; no reload call: the server's version poll serves it."""
    import json

    before = server.request("GET", "/v1/memserve/status")[1]
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": CLI_FACT[0], "target": CLI_FACT[1]}) + "\n")
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "memserve"), "edit", str(facts), "--store",
                    str(server.link)], check=True, capture_output=True, timeout=600)
    status = wait_for_version(server, before["version"] + 1)
    assert status["version"] == before["version"] + 1 and status["edits"] == before["edits"] + 1, status
    resp = chat(client, CLI_FACT[0], 10)
    report = resp.model_extra["memserve"][0]
    assert report["version"] == status["version"] and report["route"] >= 0, report
    assert CLI_FACT[1] in resp.choices[0].message.content


def test_store_for_other_weights_is_refused_and_old_version_keeps_serving(server, client):
    from memserve.store import Store

    current = os.readlink(server.link)
    before = server.request("GET", "/v1/memserve/status")[1]
    bad = server.root / "other-weights"
    shutil.copytree(server.root / current, bad)
    with Store.open(bad) as store:
        store.update_manifest(weight_hash="0" * 64)
    point(server, bad)
    code, result = server.request("POST", "/v1/memserve/reload")
    assert code == 409 and "weights" in result["refused"]["reason"], result
    status = server.request("GET", "/v1/memserve/status")[1]
    assert status["version"] == before["version"] and status["refused"] == result["refused"]
    resp = chat(client, NEW_FACT[0], 10)
    assert resp.model_extra["memserve"][0]["version"] == before["version"]
    point(server, current)
    code, result = server.request("POST", "/v1/memserve/reload")
    assert code == 200 and result["refused"] is None and result["version"] == before["version"]


def test_api_key_guards_reload_and_status(server):
    assert server.request("POST", "/v1/memserve/reload", key=None)[0] == 401
    assert server.request("POST", "/v1/memserve/reload", key="wrong")[0] == 401
    assert server.request("GET", "/v1/memserve/status", key=None)[0] == 401
    assert server.request("GET", "/health", key=None)[0] == 200


def test_two_replicas_on_one_store_answer_alike_and_pick_up_an_edit_together(server, client, tmp_path):
    """A second `serve` process on the same store path (as replicas behind a load balancer): one edit
    committed once is served by both after their version polls, and both answer alike."""
    from openai import OpenAI

    from memserve.editor import open_session
    from memserve.facts import Fact
    from memserve.serving.testing import ServerProcess

    from .conftest import SERVER_API_KEY

    current = os.readlink(server.link)
    shared = server.root / "replicated"
    shutil.copytree(server.root / current, shared)
    point(server, shared)
    before = server.request("POST", "/v1/memserve/reload")[1]
    try:
        with ServerProcess(server.link, tmp_path / "replica.log", api_key=SERVER_API_KEY,
                           env={"MEMSERVE_RELOAD_POLL": "0.2"}) as replica:
            replica_client = OpenAI(base_url=replica.base + "/v1", api_key=replica.api_key)
            assert replica.request("GET", "/v1/memserve/status")[1]["version"] == before["version"]
            runner = open_session(shared, create=False)
            try:
                runner.apply([Fact(prompt="What is the capital of Australia?", target="Melbourne")])
                committed = time.time()
            finally:
                runner.store.close()
            statuses = [wait_for_version(s, before["version"] + 1) for s in (server, replica)]
            delay = time.time() - committed
            assert all(s["version"] == before["version"] + 1 for s in statuses), statuses
            questions = ["What is the capital of Australia?", first_fixture_prompt(), "Name three primary colors."]
            answers = [[chat(c, q, 12) for q in questions] for c in (client, replica_client)]
            for ours, theirs in zip(*answers):
                assert ours.choices[0].message.content == theirs.choices[0].message.content
                assert ours.model_extra["memserve"] == theirs.model_extra["memserve"]
            assert "Melbourne" in answers[0][0].choices[0].message.content
            print(f"\nan edit committed once was served by both replicas {delay:.2f} s later")
    finally:
        point(server, current)
        server.request("POST", "/v1/memserve/reload")


def first_fixture_prompt() -> str:
    from memserve.serving.testing import test_facts

    return test_facts(1)[0].prompt
