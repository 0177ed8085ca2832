"""`memserve demo`: edit a few bundled facts, serve the store with vLLM, ask before and after.

Questions go in as chat turns (the model's chat template, as `/v1/chat/completions` sends them):
each edited question, a rephrase of each, questions of the same shape that nobody edited and other
questions about an edited subject; those last two should keep the base model's answer, and the demo
says so when one does not (and when a rephrase misses its edit).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .editor import open_session, store_model_dir
from .facts import read_facts
from .models import model_id, resolve_model

# Same shape as the edited questions, never edited: their answers must not change.
NEIGHBOURS = ["In which city is the Eiffel Tower located?", "What is the capital of Canada?",
              "What is the largest ocean on Earth?"]
# About an edited subject but asking something else (the relation check): unedited too.
SAME_SUBJECT = ["Who founded Acme Robotics?", "When was the Louvre built?"]
MAX_TOKENS = 24


def run_demo(store: Path) -> None:
    console = Console()
    with resources.as_file(resources.files("memserve").joinpath("data/demo_facts.jsonl")) as path:
        facts, _ = read_facts(path)
    console.print(f"Editing {len(facts)} facts into {store} (MEMOIR, embedded SmolLM2-135M-Instruct)...")
    runner = open_session(store, facts=facts)
    report = runner.apply(facts)
    chat = runner.edited.chat
    tokenizer = runner.edited.tokenizer
    served_name = model_id(resolve_model(store_model_dir(runner.store)))
    runner.store.close()
    console.print(f"{report.added} new edits, {report.skipped} already in the store. Starting vLLM on the store...")

    from .serving import vllm_backend

    engine = vllm_backend(str(store))
    asked = [(f.prompt, "edited") for f in facts] + [(f.rephrases[0], "rephrase") for f in facts if f.rephrases]
    asked += [(q, "not edited") for q in NEIGHBOURS] + [(q, "same subject, not edited") for q in SAME_SUBJECT]
    prompts = [chat.format(question) for question, _ in asked]
    base, _ = engine.generate(prompts, MAX_TOKENS, use_memory=False)
    edited, routes = engine.generate(prompts, MAX_TOKENS)
    labels = engine.route_labels(routes)
    table = Table(title="Chat answers through vLLM (greedy): base model vs edited model")
    for column in ("question", "", "base model", "edited model", "edit used"):
        table.add_column(column)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip() or "(empty)"  # noqa: E731
    leaked, missed = [], []
    for (question, kind), b, n, label, route in zip(asked, base, edited, labels, routes):
        same = " (unchanged)" if b == n else ""
        if kind.endswith("not edited") and route >= 0:
            leaked.append(question)
            label = f"[red]{label} (should be none)[/red]"
        if kind == "rephrase" and route < 0:
            missed.append(question)
            label = f"[yellow]{label} (missed its edit)[/yellow]"
        table.add_row(question, kind, decode(b), decode(n) + same, label)
    console.print(table)
    unedited = len(NEIGHBOURS) + len(SAME_SUBJECT)
    if leaked:
        console.print(f"[red]{len(leaked)} of {unedited} questions nobody edited reached an edit[/red] (README, "
                      "'Specificity'); `memserve route QUESTION --chat` shows why.", highlight=False)
    else:
        console.print(f"None of the {unedited} questions nobody edited reached an edit: an edit applies to questions "
                      "that name its subject and ask what it asks.", highlight=False)
    if missed:
        console.print(f"[yellow]{len(missed)} rephrase(s) reached no edit[/yellow] ({'; '.join(missed)}): the relation "
                      "check turns away some rephrases with the other questions (README, 'Relation check'); "
                      f"`memserve route \"{missed[0]}\" --chat --store {store}` shows the scores.", highlight=False)
    body = {"model": served_name, "messages": [{"role": "user", "content": facts[-1].rephrases[0] if facts[-1].rephrases
                                                else facts[-1].prompt}], "max_tokens": MAX_TOKENS, "temperature": 0}
    console.print("Serve it over HTTP (OpenAI API):", highlight=False)
    console.print(f"  .venv/bin/memserve serve --store {store}", highlight=False)
    console.print("then, in another shell:", highlight=False)
    console.print(f"  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
                  f"-d '{json.dumps(body)}'", highlight=False, soft_wrap=True)
