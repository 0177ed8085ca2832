"""`memserve demo`: edit a few bundled facts, serve the store with vLLM, ask before and after."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .editor import open_session
from .facts import read_facts

UNRELATED = "What is the largest ocean on Earth?"


def run_demo(store: Path) -> None:
    console = Console()
    with resources.as_file(resources.files("memserve").joinpath("data/demo_facts.jsonl")) as path:
        facts, _ = read_facts(path)
    console.print(f"Editing {len(facts)} facts into {store} (MEMOIR, embedded SmolLM2-135M-Instruct)...")
    runner = open_session(store, facts=facts)
    report = runner.apply(facts)
    tokenizer = runner.edited.tokenizer
    runner.store.close()
    console.print(f"{report.added} new edits, {report.skipped} already in the store. Starting vLLM on the store...")

    from .serving import vllm_backend

    engine = vllm_backend(str(store))
    questions = [f.prompt for f in facts] + [f.rephrases[0] for f in facts if f.rephrases] + [UNRELATED]
    prompts = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in questions]
    base, _ = engine.generate(prompts, 16, use_memory=False)
    edited, routes = engine.generate(prompts, 16)
    labels = engine.route_labels(routes)
    table = Table(title="Greedy answers through vLLM: base model vs edited model")
    for column in ("question", "base", "edited", "edit used"):
        table.add_column(column)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip() or "(ends at once)"  # noqa: E731
    for question, b, n, label in zip(questions, base, edited, labels):
        table.add_row(question, decode(b), decode(n), label)
    console.print(table)
    console.print(f"Serve it over HTTP (OpenAI API): .venv/bin/memserve serve --store {store}")
