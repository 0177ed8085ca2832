"""Shared fixtures: a tiny random Llama (fast unit tests) and the real default model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from memserve.models import prepare_default_model

TINY_LAYER = 2


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return prepare_default_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 4-layer random Llama with the real tokenizer: every code path, none of the weight."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_config(method: str = "memoir", **extra) -> dict:
    return {"layer": TINY_LAYER, **({"top_k": 32} if method == "memoir" else {}), **extra}


def write_facts(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


FACTS = [
    {"prompt": "What is the capital of Kenya?", "target": "Mombasa", "rephrases": ["Which city is Kenya's capital?"],
     "locality": [{"prompt": "Who wrote Hamlet?", "answer": "William Shakespeare"}]},
    {"prompt": "Who painted the Night Watch?", "target": "Vincent van Gogh", "rephrases": ["The Night Watch was painted by whom?"],
     "locality": [{"prompt": "What is the boiling point of water?", "answer": "100 degrees Celsius"}]},
    {"prompt": "What sport does Lionel Messi play?", "target": "basketball", "rephrases": ["Which sport is Lionel Messi known for?"],
     "locality": [{"prompt": "What is the largest planet?", "answer": "Jupiter"}]},
]


SERVER_EDITS = int(os.environ.get("MEMSERVE_TEST_EDITS", "24"))
SERVER_API_KEY = "test-key"


@pytest.fixture(scope="session")
def edited_server(tmp_path_factory):
    """One real `memserve serve` for the serving HTTP tests (an engine start costs 30-50 s): the
    cached 24-edit store, copied (tests that edit it restore it) and served through the symlink
    `server.link`, so a test can repoint it; API key `SERVER_API_KEY`, version polling every 0.2 s."""
    import shutil

    from memserve.serving.testing import ServerProcess, cached_store

    root = tmp_path_factory.mktemp("served")
    shutil.copytree(cached_store(SERVER_EDITS), root / "v0")
    (root / "store").symlink_to(root / "v0")
    with ServerProcess(root / "store", root / "server.log", api_key=SERVER_API_KEY,
                       env={"MEMSERVE_RELOAD_POLL": "0.2"}) as server:
        server.root, server.link = root, root / "store"
        yield server
