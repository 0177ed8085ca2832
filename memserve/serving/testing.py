"""Helpers for the serving tests: a cached store of real edits on the default model.

Training edits costs seconds each, so the tests share one store per (edit count, store format,
fixture revision, model, method defaults) under `$MEMSERVE_HOME/test-stores/`; it is built when
missing. The serving tests only need *a* store with real edits (they compare vLLM with the
transformers reference on the same store).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from pathlib import Path
from typing import Sequence

from memserve.models import cache_dir

# Bump when the trainer changes what an edit stores, so fixtures are rebuilt (2: chat routing keys,
# 3: subject anchors).
FIXTURE_REVISION = 3


def test_facts(count: int):
    """The first `count` fixture facts (`memserve/data/fixture_facts.jsonl`: six hand-written facts,
    then ZsRE dev rows; shipped with the package, so a fresh install builds the same stores)."""
    from importlib import resources

    from memserve.facts import read_facts

    with resources.as_file(resources.files("memserve").joinpath("data/fixture_facts.jsonl")) as path:
        facts, _ = read_facts(path)
    if count > len(facts):
        raise ValueError(f"the fixture has {len(facts)} facts, {count} were asked for")
    return facts[:count]


def cached_store(count: int, method: str = "memoir", facts_file: Path | None = None) -> Path:
    """Path of a store holding `count` edits of `test_facts(count)`, or of the first `count` facts of
    `facts_file` (built once, then reused)."""
    from memserve.editor import open_session
    from memserve.methods import memory_class
    from memserve.models import prepare_default_model
    from memserve.store import Store
    from memserve.store.store import FORMAT_VERSION

    model_dir = prepare_default_model()
    root = cache_dir() / "test-stores"
    root.mkdir(parents=True, exist_ok=True)
    stamp = json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers", 0)
    # A change of the method's default options makes a new fixture, so tests exercise the defaults.
    defaults = json.dumps(memory_class(method).config_class().to_dict(), sort_keys=True)
    key = defaults if facts_file is None else defaults + hashlib.sha256(Path(facts_file).read_bytes()).hexdigest()
    source = "" if facts_file is None else Path(facts_file).stem + "-"
    path = root / f"{method}-{source}{count}-v{FORMAT_VERSION}.{FIXTURE_REVISION}-l{stamp}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if Store.exists(path) and _complete(path, count):
            return path
        shutil.rmtree(path, ignore_errors=True)
        facts = test_facts(count) if facts_file is None else _file_facts(facts_file, count)
        staging = path.with_name(path.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        runner = open_session(staging, method=method)
        if count:
            from tqdm import tqdm

            with tqdm(total=count, desc=f"building {path.name}", unit="edit", disable=count < 50) as bar:
                runner.apply(facts, progress=lambda *_: bar.update())
        runner.store.close()
        staging.rename(path)
        return path


def _file_facts(path: Path, count: int):
    from memserve.facts import read_facts

    facts, _ = read_facts(path, skip_invalid=True)  # real data has a few unusable rows (e.g. an empty answer)
    if count > len(facts):
        raise ValueError(f"{path} has {len(facts)} valid facts, {count} were asked for")
    return facts[:count]


def _complete(path: Path, count: int) -> bool:
    """The cached store opens, holds `count` edits and the current memory code rebuilds it. The path
    already names everything a fixture depends on (format, revision, model, method defaults), so a
    store that exists but cannot be loaded is a regression: its error fails the test, it is not
    silently rebuilt. Only a store with another edit count (e.g. written by hand) is rebuilt."""
    import torch

    from memserve.editor import load_memory
    from memserve.store import Store

    with Store.open(path) as store:
        m = store.manifest
        load_memory(store, torch.zeros(m["hidden_size"], m["intermediate_size"]))
        return store.num_edits == count


def empty_store(path: Path, method: str = "memoir") -> Path:
    """A fresh store with no edits at `path`."""
    from memserve.editor import open_session

    runner = open_session(path, method=method)
    runner.store.close()
    return path


class ServerProcess:
    """`memserve.serving.serve(store)` in a subprocess, in the real layout (API server + engine process);
    `request` sends the API key. Used as a context manager."""

    def __init__(self, store: Path, log: Path, api_key: str | None = None, env: dict | None = None, timeout: float = 400,
                 engine_args: Sequence[str] = ()):
        import os
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.store, self.log, self.api_key, self.timeout = Path(store), Path(log), api_key, timeout
        self.env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        self.env.update({"MEMSERVE_API_KEY": api_key} if api_key else {}, **(env or {}))
        self.engine_args = list(engine_args)
        self.proc = None

    def __enter__(self) -> "ServerProcess":
        import subprocess
        import sys
        import time

        code = (f"from memserve.serving import serve; "
                f"serve({str(self.store)!r}, port={self.port}, engine_args={self.engine_args!r})")
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + self.timeout
        while self.request("GET", "/health", check=False)[0] != 200:
            if self.proc.poll() is not None or time.time() > deadline:
                self.__exit__()
                raise RuntimeError(f"server did not come up ({self.proc.returncode}):\n{self.log.read_text()[-4000:]}")
            time.sleep(2)
        return self

    def __exit__(self, *exc) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def request(self, method: str, path: str, key: str | None = "default", check: bool = True, body: dict | None = None,
                headers: dict | None = None) -> tuple[int, dict]:
        """(status, JSON body); `key` None sends no Authorization header; `body` is sent as JSON. Connection
        errors are status 0 unless `check`."""
        import urllib.error
        import urllib.request

        key = self.api_key if key == "default" else key
        all_headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        req = urllib.request.Request(self.base + path, method=method, headers=all_headers, data=data)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except OSError:
            if check:
                raise
            return 0, {}


# Tiny random-weight checkpoints of each supported family (tests and the parallelism probe): head_dim
# 32 is the smallest vLLM's CPU attention supports; 4 heads / 2 KV heads split over 2 ranks.
TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True)
TINY_FAMILIES = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", {}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {}),
    "Gemma2ForCausalLM": ("Gemma2Config", {}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {}),
    "Phi3ForCausalLM": ("Phi3Config", {"pad_token_id": 0}),
}


def tiny_checkpoint(path, architecture: str, tokenizer) -> None:
    """Write a random-weight `architecture` checkpoint of `TINY_SHAPE` with `tokenizer` to `path`."""
    import torch
    import transformers

    config_name, extra = TINY_FAMILIES[architecture]
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **TINY_SHAPE, **extra)
    config.architectures = [architecture]
    torch.manual_seed(0)
    getattr(transformers, architecture)(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
