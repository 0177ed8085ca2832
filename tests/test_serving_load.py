"""`memserve serve` under load: 216 concurrent requests against the session's shared server.

Half ask edited facts, half unrelated questions, each as a plain completion and as a chat turn (the
model's own template), non-streaming, streaming, or streaming closed after the first token (the
server aborts the request). Every response must be routed as the transformers reference routes its
prompt and carry the reference's greedy text (a prefix of it when aborted), so one request's route
or memory never leaks into another's; afterwards the runtime holds no routing state.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]

NUM_EDITS = int(os.environ.get("MEMSERVE_TEST_EDITS", "24"))
MAX_TOKENS = 8
REQUESTS = 216
UNRELATED = [
    "Explain photosynthesis in one sentence.",
    "What is 12 times 12?",
    "Name three primary colors.",
    "Who was the first person to walk on the Moon?",
    "Translate 'good morning' into French.",
    "Write a haiku about the sea.",
    "What is the boiling point of water?",
]
MODES = ("full", "stream", "abort")


@pytest.fixture(scope="module")
def cases():
    """(endpoint, question, edited?) for every distinct prompt, and the reference (text, route) of each."""
    import gc

    from memserve.editor import open_session
    from memserve.serving.testing import cached_store, test_facts

    facts = test_facts(NUM_EDITS)
    unrelated = [f.locality[0][0] for f in facts if f.locality] + UNRELATED
    questions = [(f.prompt, True) for f in facts] + [(q, False) for q in unrelated[: len(facts)]]
    distinct = [(endpoint, q, edited) for endpoint in ("completion", "chat") for q, edited in questions]
    runner = open_session(cached_store(NUM_EDITS), create=False)
    try:
        edited = runner.edited
        ids = [edited.chat.format(q) if endpoint == "chat" else edited.encode(q) for endpoint, q, _ in distinct]
        out, routes = edited.generate(ids, MAX_TOKENS)
        return distinct, [(edited.tokenizer.decode(o), r) for o, r in zip(out, routes.tolist())]
    finally:
        runner.store.close()
        del runner
        gc.collect()


async def ask(client, http, model: str, endpoint: str, question: str, mode: str) -> tuple[str, int, str]:
    """(text, route, response id) of one request in `mode` (see MODES)."""
    common = dict(model=model, max_tokens=MAX_TOKENS, temperature=0)
    if endpoint == "chat":
        create = client.chat.completions.create
        common["messages"] = [{"role": "user", "content": question}]
    else:
        create = client.completions.create
        common["prompt"] = question
    if mode == "full":
        resp = await create(**common)
        choice = resp.choices[0]
        return (choice.message.content if endpoint == "chat" else choice.text), resp.model_extra["memserve"][0]["route"], resp.id
    stream = await create(**common, stream=True)
    parts, rid = [], None
    async for chunk in stream:
        rid = chunk.id
        if chunk.choices:
            piece = chunk.choices[0].delta.content if endpoint == "chat" else chunk.choices[0].text
            parts.append(piece or "")
            if mode == "abort" and piece:
                break
    await stream.close()  # an early close aborts the request on the server
    report = (await http.get(f"/v1/memserve/routes/{rid}")).json()
    return "".join(parts), report["memserve"][0]["route"], rid


def test_concurrent_mixed_requests_route_like_the_reference(edited_server, cases):
    import httpx
    from openai import AsyncOpenAI

    distinct, reference = cases
    plan = [(k % len(distinct), MODES[(k // len(distinct) + k) % len(MODES)]) for k in range(REQUESTS)]
    before = edited_server.request("GET", "/v1/memserve/status")[1]

    async def run():
        headers = {"Authorization": f"Bearer {edited_server.api_key}"}
        async with AsyncOpenAI(base_url=edited_server.base + "/v1", api_key=edited_server.api_key, timeout=600) as client, \
                httpx.AsyncClient(base_url=edited_server.base, headers=headers, timeout=600) as http:
            model = (await client.models.list()).data[0].id
            return await asyncio.gather(*[ask(client, http, model, *distinct[i][:2], mode) for i, mode in plan],
                                        return_exceptions=True)

    started = time.perf_counter()
    results = asyncio.run(run())
    seconds = time.perf_counter() - started
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} requests failed, e.g. {errors[0]!r}"
    wrong = []
    for (i, mode), (text, route, rid) in zip(plan, results):
        want_text, want_route = reference[i]
        ok_text = want_text.startswith(text) and bool(text or not want_text) if mode == "abort" else text == want_text
        if route != want_route or not ok_text:
            wrong.append((distinct[i], mode, rid, text, route, want_text, want_route))
    assert not wrong, f"{len(wrong)} of {len(plan)} responses differ from the reference, e.g. {wrong[:3]}"
    routed = sum(reference[i][1] >= 0 for i, _ in plan)
    assert 0 < routed < len(plan)  # both kinds occurred (how many edits fire is the core's business)

    deadline = time.time() + 30  # finished and aborted requests are freed at the engine's next step
    while (status := edited_server.request("GET", "/v1/memserve/status")[1])["live_requests"] and time.time() < deadline:
        time.sleep(0.5)
    assert status["live_requests"] == 0 and status["pinned_memories"] == 0, status
    assert (status["version"], status["edits"]) == (before["version"], before["edits"]) == (before["version"], NUM_EDITS)
    print(f"\n{len(plan)} concurrent requests ({routed} routed to an edit, "
          f"{sum(m == 'abort' for _, m in plan)} aborted) in {seconds:.1f} s")
