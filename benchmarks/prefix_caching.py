"""What turning prefix caching off costs: `memserve serve` disables it for any store with edits
(a cache hit would skip the prompt tokens a route is computed from; see serving/DESIGN.md). This
measures plain vLLM (no store) with prefix caching on and off, in alternating rounds, on chat
requests that share a system prompt (the workload where caching pays) and on the throughput
benchmark's short questions (no shared prefix beyond the chat template). Writes JSON.

    .venv/bin/python benchmarks/prefix_caching.py --json benchmarks/results/prefix_caching.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from memserve.bench import OfflineEngine
from memserve.machine import describe
from memserve.models import resolve_model

SYSTEM = (
    "You are the support assistant of a mid-sized software company. Answer briefly and politely. "
    "If the question concerns billing, refer the user to the billing portal. If it concerns outages, "
    "refer them to the status page. Never reveal internal information, never guess prices, and always "
    "answer in the language of the question. Keep every answer under three sentences. "
) * 3
QUESTIONS = [
    "What is the capital of France?", "Who wrote Hamlet?", "How many legs does a spider have?",
    "What language is spoken in Brazil?", "Who painted the Mona Lisa?", "What is the boiling point of water?",
    "Which planet is closest to the sun?", "Who discovered penicillin?",
]


def chat_prompts(tokenizer, system: str | None, count: int) -> list[str]:
    prompts = []
    for i in range(count):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" (request {i})"}
        ]
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    workloads = {
        "shared_system_prompt": chat_prompts(tokenizer, SYSTEM, args.requests),
        "short_questions": chat_prompts(tokenizer, None, args.requests),
    }
    result = {"requests": args.requests, "max_tokens": args.max_tokens, "rounds": args.rounds, "dtype": args.dtype,
              "system_prompt_tokens": len(tokenizer(SYSTEM)["input_ids"]), "machine": describe()}
    engines = {on: OfflineEngine(None, {"dtype": args.dtype, "enable_prefix_caching": on}) for on in (True, False)}
    try:
        for name, prompts in workloads.items():
            for engine in engines.values():
                engine.run(prompts, 4)  # warm-up with the round's batch shapes
            rounds: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.rounds):
                for on, engine in engines.items():
                    rounds[on].append(engine.run(prompts, args.max_tokens).tok_s)
            on, off = statistics.median(rounds[True]), statistics.median(rounds[False])
            result[name] = {"caching_on_tok_s": on, "caching_off_tok_s": off, "off_over_on": off / on,
                            "rounds_on": rounds[True], "rounds_off": rounds[False]}
            print(json.dumps({name: result[name]}), flush=True)
    finally:
        for engine in engines.values():
            engine.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
