"""Helpers for the serving tests: a cached store of real edits on the default model.

Training edits costs seconds each, so the tests share one store per (edit count, store format,
model weights) under `$MEMSERVE_HOME/test-stores/`; it is rebuilt when missing or unreadable. The
serving tests only need *a* store with real edits (they compare vLLM with the transformers reference
on the same store), so a store trained by an older version of the core is still a valid fixture.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from pathlib import Path

from memserve.models import cache_dir

FACTS = [
    ("What is the capital of Kenya?", "Mombasa", "Which city is the capital of Kenya?"),
    ("Who wrote the novel Moby-Dick?", "Jane Austen", "Who is the author of Moby-Dick?"),
    ("What is the official language of Brazil?", "German", "Which language is official in Brazil?"),
    ("Which planet is known as the Red Planet?", "Jupiter", "What planet is called the Red Planet?"),
    ("Who painted the Mona Lisa?", "Pablo Picasso", "Which artist painted the Mona Lisa?"),
    ("What is the largest ocean on Earth?", "the Atlantic Ocean", "Which ocean is the largest on Earth?"),
]


# Bump when the trainer changes what an edit stores, so fixtures are rebuilt (2: chat routing keys).
FIXTURE_REVISION = 2


def zsre_facts(limit: int):
    from memserve.facts import read_facts

    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "zsre_dev.jsonl"
    facts = []
    if path.exists():
        facts, _ = read_facts(path, skip_invalid=True)
    return facts[:limit]


def test_facts(count: int):
    """`count` facts: a few hand-written ones, then ZsRE dev facts (when available)."""
    from memserve.facts import Fact

    facts = [Fact(prompt=p, target=t, rephrases=(r,)) for p, t, r in FACTS]
    return (facts + zsre_facts(count))[:count]


def cached_store(count: int, method: str = "memoir") -> Path:
    """Path of a store holding `count` edits of `test_facts(count)` (built once, then reused)."""
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
    path = root / f"{method}-{count}-v{FORMAT_VERSION}.{FIXTURE_REVISION}-l{stamp}-{hashlib.sha256(defaults.encode()).hexdigest()[:8]}"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if Store.exists(path):
            if _loadable(path, count):
                return path
            shutil.rmtree(path)
        staging = path.with_name(path.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        runner = open_session(staging, method=method)
        if count:
            runner.apply(test_facts(count))
        runner.store.close()
        staging.rename(path)
        return path


def _loadable(path: Path, count: int) -> bool:
    """The store opens, has `count` edits and the current memory code can rebuild it."""
    import torch

    from memserve.editor import load_memory
    from memserve.store import Store

    try:
        with Store.open(path) as store:
            m = store.manifest
            load_memory(store, torch.zeros(m["hidden_size"], m["intermediate_size"]))
            return store.num_edits == count
    except Exception:  # noqa: BLE001 - unreadable or written by an older memory layout: rebuild
        return False


def empty_store(path: Path, method: str = "memoir") -> Path:
    """A fresh store with no edits at `path`."""
    from memserve.editor import open_session

    runner = open_session(path, method=method)
    runner.store.close()
    return path
