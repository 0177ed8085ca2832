"""`memserve demo`: edit a few bundled facts, then ask the questions before and after."""

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
    facts_path = resources.files("memserve").joinpath("data/demo_facts.jsonl")
    with resources.as_file(facts_path) as path:
        facts, _ = read_facts(path)
    console.print(f"Editing {len(facts)} facts into {store} (MEMOIR, embedded SmolLM2-135M-Instruct)...")
    runner = open_session(store, facts=facts)
    report = runner.apply(facts)
    console.print(f"{report.added} new edits, {report.skipped} already in the store.")
    edited = runner.edited
    questions = [f.prompt for f in facts] + [f.rephrases[0] for f in facts if f.rephrases] + [UNRELATED]
    prompts = [edited.encode(q) for q in questions]
    base, _ = edited.generate(prompts, 16, use_memory=False)
    new, routes = edited.generate(prompts, 16)
    table = Table(title="Greedy answers, base model vs edited model")
    for column in ("question", "base", "edited", "route"):
        table.add_column(column)
    decode = lambda ids: edited.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    for question, b, n, r in zip(questions, base, new, routes.tolist()):
        table.add_row(question, decode(b), decode(n), edited.memory.route_label(r))
    console.print(table)
