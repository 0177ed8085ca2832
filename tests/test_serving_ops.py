"""Serving operations without an engine: the runtime's memory swap, the store watcher (hot reload)
on a tiny real store, and the API-key rule of `serve`."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from memserve.methods import NO_ROUTE, MemoirConfig, MemoirMemory
from memserve.serving.runtime import BatchPlan, MemoryRuntime

from .conftest import FACTS, tiny_config
from .test_serving_runtime import H, I, make_memoir, reference, run_schedule


@pytest.mark.parametrize("dense", [False, True], ids=["compact", "dense"])
def test_swap_keeps_live_requests_on_their_memory(dense):
    """Request a starts under v1 and finishes after the swap to v2 with v1's route and delta; b starts
    after the swap and gets v2. Both share steps (one flat batch, two memories)."""
    old, prompts = make_memoir(3, seed=0)
    new, _ = make_memoir(4, seed=0)  # same first prompts, other residual
    g = torch.Generator().manual_seed(5)
    seqs = {"a": torch.cat([prompts[1], torch.randn(2, prompts[1].shape[1], generator=g)]),
            "b": torch.cat([prompts[1], torch.randn(2, prompts[1].shape[1], generator=g)])}
    plens = {"a": len(prompts[1]), "b": len(prompts[1])}
    runtime = MemoryRuntime(old, version=1, dense=dense)
    got = run_schedule(runtime, seqs, plens, [[("a", 0, 4)]])
    runtime.swap(new, version=2)
    later = run_schedule(runtime, seqs, plens, [[("a", 4, plens["a"] - 4), ("b", 0, plens["b"])],
                                                [("a", plens["a"], 2), ("b", plens["b"], 2)]])
    assert runtime.pinned_memories() == 1
    for rid, memory in (("a", old), ("b", new)):
        rows = {**got[rid], **later[rid]}
        want, route = reference(memory, seqs[rid], plens[rid])
        assert route >= 0 and runtime.route_info(rid).route == route
        for pos, row in rows.items():
            torch.testing.assert_close(row, want[pos], msg=f"{rid} position {pos}")
    assert (runtime.route_info("a").version, runtime.route_info("b").version) == (1, 2)
    runtime.free("a")
    assert runtime.pinned_memories() == 0 and runtime.route_info("a").version == 1


def test_empty_memory_keeps_requests_unrouted_after_a_swap():
    full, prompts = make_memoir(3)
    empty = MemoirMemory(MemoirConfig(top_k=16, tau=0.6), torch.randn(H, I))
    runtime = MemoryRuntime(empty, version=0)
    a = prompts[0]
    runtime.begin_step(BatchPlan(["x"], np.array([0, 3]), np.array([0]), np.array([5])))
    runtime.apply(torch.zeros(3, H), a[:3])
    runtime.swap(full, version=1)
    runtime.begin_step(BatchPlan(["x", "y"], np.array([0, 2, 7]), np.array([3, 0]), np.array([5, 5])))
    out = runtime.apply(torch.zeros(7, H), torch.cat([a[3:], a]))
    assert out[:2].abs().max() == 0  # x started without edits: stays on the base model
    assert runtime.route_info("x").route == NO_ROUTE and runtime.route_info("y").route == 0


@pytest.fixture
def tiny_store(tmp_path, tiny_model_dir):
    """A tiny-model store with one edit, closed; the down_proj weight it was built on."""
    from memserve.editor import open_session
    from memserve.facts import Fact
    from memserve.models import down_proj

    runner = open_session(tmp_path / "store", tiny_model_dir, method="memoir", config=tiny_config(steps=5))
    runner.apply([Fact(FACTS[0]["prompt"], FACTS[0]["target"])])
    weight = down_proj(runner.edited.model, runner.store.manifest["layer"]).weight.detach().clone()
    runner.store.close()
    return tmp_path / "store", weight


def test_watcher_follows_the_store_and_refuses_other_weights(tiny_store, tiny_model_dir):
    from memserve.editor import load_memory, open_session
    from memserve.facts import Fact
    from memserve.models import weight_hash
    from memserve.serving.reload import StoreWatcher
    from memserve.store import Store

    path, weight = tiny_store
    with Store.open(path) as store:
        runtime = MemoryRuntime(load_memory(store, weight), version=store.version)
        layer, first, identity = store.manifest["layer"], store.version, store.identity()
    watcher = StoreWatcher(path, weight, weight_hash(weight), layer, runtime, identity=identity, interval=3600)
    assert watcher.check()["version"] == first and watcher.reloads == 0

    runner = open_session(path, tiny_model_dir)
    runner.apply([Fact(FACTS[1]["prompt"], FACTS[1]["target"])])
    runner.store.close()
    watcher.poll()  # interval not reached: nothing read
    assert runtime.version == first
    watcher.next_poll = 0
    watcher.poll()  # sees the new version, rebuilds it off the step thread
    watcher.wait()
    watcher.poll()  # the next step serves it
    assert runtime.version == first + 1 and runtime.memory.num_edits == 2 and watcher.reloads == 1

    with Store.open(path) as store:
        good = store.manifest["weight_hash"]
        store.update_manifest(weight_hash="0" * 64)
    status = watcher.check(force=True)
    assert "weights" in status["refused"]["reason"] and status["version"] == first + 1
    with Store.open(path) as store:
        store.update_manifest(weight_hash=good)
    assert watcher.check(force=True)["refused"] is None and watcher.reloads == 1  # same version: no rebuild

    os.rename(path, path.with_name("moved"))
    assert "no store" in watcher.check()["error"] and runtime.version == first + 1


def watched(path, weight, interval=3600):
    from memserve.editor import load_memory
    from memserve.models import weight_hash
    from memserve.serving.reload import StoreWatcher
    from memserve.store import Store

    with Store.open(path) as store:
        runtime = MemoryRuntime(load_memory(store, weight), version=store.version)
        return StoreWatcher(path, weight, weight_hash(weight), store.manifest["layer"], runtime,
                            identity=store.identity(), interval=interval)


def test_watcher_tells_stores_apart_at_the_same_version(tiny_store, tiny_model_dir, tmp_path):
    """A symlink repointed to another compatible store at the same version number is a reload."""
    from memserve.editor import open_session
    from memserve.facts import Fact

    path, weight = tiny_store
    other = tmp_path / "other"
    runner = open_session(other, tiny_model_dir, method="memoir", config=tiny_config(steps=5))
    runner.apply([Fact(FACTS[1]["prompt"], FACTS[1]["target"])])
    runner.store.close()
    link = tmp_path / "served"
    link.symlink_to(path)
    watcher = watched(link, weight)
    before = watcher.runtime.memory.route_keys.clone()
    link.unlink()
    link.symlink_to(other)
    status = watcher.check()
    assert status["loading"] is not None and status["version"] == 1  # same version number, other content
    watcher.wait()
    watcher.install()
    assert watcher.reloads == 1 and not torch.equal(watcher.runtime.memory.route_keys, before)
    assert watcher.check()["loading"] is None and watcher.reloads == 1  # now served: nothing to do


def test_watcher_rebuilds_off_the_step_thread_and_survives_errors(tiny_store, tiny_model_dir, monkeypatch):
    import threading

    import lmdb

    import memserve.editor
    from memserve.editor import open_session
    from memserve.facts import Fact
    from memserve.store import Store

    path, weight = tiny_store
    watcher = watched(path, weight)
    runtime, served = watcher.runtime, watcher.runtime.memory
    runner = open_session(path, tiny_model_dir)
    runner.apply([Fact(FACTS[1]["prompt"], FACTS[1]["target"])])
    runner.store.close()

    # A slow rebuild: poll (the step thread) returns while it runs; requests keep the old memory.
    release, real_load = threading.Event(), memserve.editor.load_memory
    monkeypatch.setattr(memserve.editor, "load_memory", lambda *a: (release.wait(60), real_load(*a))[1])
    status = watcher.check()
    assert status["loading"] == 2 and runtime.memory is served
    watcher.poll()
    assert runtime.memory is served and watcher.status()["loading"] == 2
    release.set()
    watcher.wait()
    watcher.poll()
    assert runtime.memory is not served and runtime.version == 2 and watcher.status()["loading"] is None

    # Errors while polling or rebuilding are reported; the served memory stays.
    served = runtime.memory
    monkeypatch.setattr(Store, "identity", lambda self: (_ for _ in ()).throw(lmdb.Error("disk on fire")))
    status = watcher.check(force=True)
    assert "disk on fire" in status["error"] and runtime.memory is served
    monkeypatch.undo()
    runner = open_session(path, tiny_model_dir)
    runner.apply([Fact(FACTS[2]["prompt"], FACTS[2]["target"])])
    runner.store.close()
    monkeypatch.setattr(memserve.editor, "load_memory", lambda *a: (_ for _ in ()).throw(RuntimeError("bad tensor")))
    watcher.check()
    watcher.wait()
    watcher.poll()
    assert "bad tensor" in watcher.status()["error"] and runtime.memory is served and runtime.version == 2


def test_api_key_rule(monkeypatch):
    from memserve.serving.server import api_key_args, is_loopback

    for env in ("MEMSERVE_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(env, raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("example.org")
    assert api_key_args("127.0.0.1", []) == []
    with pytest.raises(ValueError, match="MEMSERVE_API_KEY"):
        api_key_args("0.0.0.0", [])
    assert api_key_args("0.0.0.0", ["--api-key", "k"]) == []  # vLLM's own option
    monkeypatch.setenv("MEMSERVE_API_KEY", "s3cret")
    assert api_key_args("0.0.0.0", []) == ["--api-key", "s3cret"]
    assert api_key_args("0.0.0.0", ["--api-key=other"]) == []  # the explicit vLLM key wins


def test_serve_refuses_public_host_without_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MEMSERVE_API_KEY", "VLLM_API_KEY")}
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "memserve"), "serve", "--store", str(tmp_path / "s"),
         "--host", "0.0.0.0"], env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0 without an API key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
