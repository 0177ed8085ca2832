"""Parallelism on the real engine: `memserve serve --tensor-parallel-size 2` and
`--pipeline-parallel-size 2` answer exactly as the one-rank server, routes included, for both methods,
through chunked prefill, preemption and a hot reload.

The default model's 9 attention heads do not split in two, so this uses a tiny random Llama written
here (4 heads, 2 KV heads, intermediate 256: 128 down-projection input features per rank). Each
server first serves a MEMOIR store and then, after the store path (a symlink) is repointed, a WISE
store on the same layer: under tensor parallelism every rank must swap memories at the same step.
"""

from __future__ import annotations

import os
import time

import pytest

from memserve.serving.testing import ServerProcess, tiny_checkpoint

from .conftest import FACTS, tiny_config

pytestmark = pytest.mark.vllm

# Small batches force chunked prefill: prompts of ~15-60 tokens arrive in 16-token chunks. A KV cache
# of 5 blocks of 32 tokens (one is vLLM's null block) holds about one request of `burst`, which preempts.
ENGINE = ["--max-model-len", "128", "--max-num-batched-tokens", "16", "--max-num-seqs", "4",
          "--block-size", "32", "--num-gpu-blocks-override", "5"]
UNRELATED = ["Name three primary colors.", "Where is the Eiffel Tower?"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, default_model_dir):
    from transformers import AutoTokenizer

    from memserve.editor import open_session
    from memserve.facts import Fact

    root = tmp_path_factory.mktemp("tp")
    tiny_checkpoint(root / "model", "LlamaForCausalLM", AutoTokenizer.from_pretrained(default_model_dir))
    facts = [Fact(f["prompt"], f["target"], rephrases=tuple(f["rephrases"])) for f in FACTS[:2]]
    for method, steps in (("memoir", 8), ("wise", 20)):
        runner = open_session(root / method, root / "model", method=method, config=tiny_config(method, steps=steps))
        runner.apply(facts)
        runner.store.close()
    return root


def point(link, target) -> None:
    tmp = f"{link}.tmp"
    os.symlink(target, tmp)
    os.replace(tmp, link)


def answers(server: ServerProcess) -> list[tuple]:
    """Greedy completions of the edit prompts, a rephrase and unrelated prompts, as a chat turn and
    as written: (text, per-token logprobs, route label) each."""
    prompts = [f["prompt"] for f in FACTS[:2]] + [FACTS[0]["rephrases"][0]] + UNRELATED
    out = []
    for prompt in prompts:
        for body in ({"messages": [{"role": "user", "content": prompt}]}, {"prompt": prompt}):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            extra = {"logprobs": True} if "messages" in body else {"logprobs": 1}
            status, reply = server.request("POST", path, body={"model": server.model, "max_tokens": 8,
                                                               "temperature": 0, **extra, **body})
            assert status == 200, reply
            choice = reply["choices"][0]
            text = choice["message"]["content"] if "messages" in body else choice["text"]
            logprobs = ([t["logprob"] for t in choice["logprobs"]["content"]] if "messages" in body
                        else choice["logprobs"]["token_logprobs"])
            out.append((text, logprobs, reply["memserve"][0]["edit"]))
    return out


def burst(server: ServerProcess) -> list[tuple]:
    """The prompts of `answers`, all at once with 64 new tokens each (chat turns and as written): more
    than the KV cache holds, so the engine preempts and recomputes some. (text, route label) each."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f["prompt"] for f in FACTS[:2]] + [FACTS[0]["rephrases"][0]] + UNRELATED
    bodies = [body for p in prompts for body in ({"messages": [{"role": "user", "content": p}]}, {"prompt": p})]

    def ask(body: dict) -> tuple:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, reply = server.request("POST", path, body={"model": server.model, "max_tokens": 64, "temperature": 0,
                                                           "ignore_eos": True, **body})
        assert status == 200, reply
        choice = reply["choices"][0]
        return choice["message"]["content"] if "messages" in body else choice["text"], reply["memserve"][0]["edit"]

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(ask, bodies))


def preemptions(server: ServerProcess) -> float:
    """vLLM's count of preempted requests, from its Prometheus `/metrics`."""
    import urllib.request

    with urllib.request.urlopen(server.base + "/metrics", timeout=60) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:num_preemptions_total"))


def serve_both_methods(stores, tmp_path, name: str, parallel: list[str]) -> dict:
    link = tmp_path / f"store-{name}"
    point(link, stores / "memoir")
    args = ENGINE + parallel
    got = {}
    with ServerProcess(link, tmp_path / f"serve-{name}.log", env={"MEMSERVE_RELOAD_POLL": "0.2"},
                       engine_args=args, timeout=600) as server:
        server.model = server.request("GET", "/v1/models")[1]["data"][0]["id"]
        got["memoir"] = answers(server)
        got["memoir burst"] = burst(server)
        point(link, stores / "wise")
        deadline = time.time() + 60
        while server.request("GET", "/v1/memserve/status")[1].get("method") != "wise":
            assert time.time() < deadline, "the WISE store was not picked up"
            time.sleep(0.5)
        got["wise"] = answers(server)
        got["wise burst"] = burst(server)
        got["status"] = server.request("GET", "/v1/memserve/status")[1]
        got["preemptions"] = preemptions(server)
    return got


@pytest.fixture(scope="module")
def one_rank(stores, tmp_path_factory):
    return serve_both_methods(stores, tmp_path_factory.mktemp("one"), "one", [])


@pytest.mark.parametrize("parallel", [["--tensor-parallel-size", "2"], ["--pipeline-parallel-size", "2"]],
                         ids=["tp2", "pp2"])
def test_two_ranks_serve_as_one(stores, one_rank, parallel, tmp_path):
    """TP: every rank holds half the features and a memory; PP: only the stage owning the edited
    layer (layer 2 of 4: the second) holds one, and status comes from it."""
    two = serve_both_methods(stores, tmp_path, parallel[0].strip("-"), parallel)
    for method in ("memoir", "wise"):
        routes = [route for _, _, route in one_rank[method]]
        assert routes[0] != "none" and routes[2] != "none"  # the edit prompts reach an edit
        if method == "memoir":
            assert routes[:4] == ["edit-0", "edit-0", "edit-1", "edit-1"] and routes[-4:] == ["none"] * 4
        for (text1, lp1, route1), (text2, lp2, route2) in zip(one_rank[method], two[method]):
            assert (text2, route2) == (text1, route1)
            assert lp2 == pytest.approx(lp1, abs=1e-4)
        # under preemption (recomputed prompts keep their routes)
        assert two[f"{method} burst"] == one_rank[f"{method} burst"]
        assert [route for _, route in two[f"{method} burst"]] == routes
    assert two["status"]["edits"] == one_rank["status"]["edits"] == 2 and two["status"]["reloads"] == 1
    assert one_rank["preemptions"] > 0 and two["preemptions"] > 0
