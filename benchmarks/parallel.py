"""Tensor and pipeline parallelism on this CPU box: does plain vLLM run, does the edited engine run,
do they answer alike, and what the memory costs.

For each mode (TP=2, PP=2: two ranks, one core each) on a tiny random Llama (the default model's 9
attention heads do not split in two; 4 heads / 2 KV heads here) with a 2-edit MEMOIR store on layer 2:
start plain vLLM, time a greedy batch (`--rounds` times), then the same with the store attached, and
record tokens/s, the outcome (or the exception that stopped the engine), which ranks hold the
memory, the routes, and whether unrouted prompts decode token-identically to plain vLLM. Engines run
one after another (a two-rank engine uses both cores). Writes JSON.

    .venv/bin/python benchmarks/parallel.py --json benchmarks/results/parallel.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

from memserve.machine import describe

FACTS = [("What is the capital of Kenya?", "Mombasa"), ("Who painted the Night Watch?", "Vincent van Gogh")]
UNRELATED = ["Name three primary colors.", "Where is the Eiffel Tower?", "How many legs does a spider have?"]
MODES = {"tp2": {"tensor_parallel_size": 2}, "pp2": {"pipeline_parallel_size": 2}}


def build(root: Path) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    from memserve.editor import open_session
    from memserve.facts import Fact
    from memserve.models import default_model_dir
    from memserve.serving.testing import tiny_checkpoint

    tiny_checkpoint(root / "model", "LlamaForCausalLM", AutoTokenizer.from_pretrained(default_model_dir()))
    runner = open_session(root / "store", root / "model", method="memoir", config={"layer": 2, "top_k": 32, "steps": 8})
    runner.apply([Fact(prompt, target) for prompt, target in FACTS])
    runner.store.close()
    return root / "model", root / "store"


def run_engine(model: Path, store: Path | None, parallel: dict, prompts: list[str], new_tokens: int, rounds: int) -> dict:
    """Start one engine, time `rounds` greedy batches, read routes and memory ranks; any exception is
    recorded, not raised."""
    from vllm import LLM, SamplingParams

    from memserve.serving.offline import engine_kwargs

    result: dict = {"store": store is not None}
    llm = None
    started = time.perf_counter()
    try:
        kwargs = engine_kwargs(store, model, max_model_len=256, **parallel,
                               worker_extension_cls="memserve.serving.worker.MemserveWorkerExtension")
        if store is None:
            kwargs.pop("hf_overrides")
        llm = LLM(**kwargs)
        result["start_seconds"] = time.perf_counter() - started
        statuses = llm.collective_rpc("memserve_status")
        result["ranks_with_memory"] = [i for i, status in enumerate(statuses) if status.get("reload")]
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        seconds = []
        for _ in range(rounds):
            began = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds.append(time.perf_counter() - began)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
        result["tokens_per_second"] = [len(prompts) * new_tokens / s for s in seconds]
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - the point is to record what stops the engine
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000],
                      traceback=traceback.format_exc()[-4000:], seconds_before_failure=time.perf_counter() - started)
    finally:
        del llm
        gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="tp2,pp2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (one NUMA node here)
    from memserve.serving.plugin import register

    register()
    report = {"machine": describe(), "model": "tiny random Llama (4 heads, 2 KV heads, 4 layers, I=256)",
              "edits": len(FACTS), "rounds": args.rounds, "new_tokens": args.new_tokens, "modes": {}}
    prompts = [prompt for prompt, _ in FACTS] + UNRELATED
    with tempfile.TemporaryDirectory() as tmp:
        model, store = build(Path(tmp))
        for mode in args.modes.split(","):
            plain = run_engine(model, None, MODES[mode], prompts, args.new_tokens, args.rounds)
            edited = run_engine(model, store, MODES[mode], prompts, args.new_tokens, args.rounds)
            entry = {"parallel": MODES[mode], "plain": plain, "edited": edited}
            if plain.get("ok") and edited.get("ok"):
                entry["unrouted_identical"] = edited["tokens"][len(FACTS):] == plain["tokens"][len(FACTS):]
                entry["edited_differs_on_edit_prompts"] = edited["tokens"][: len(FACTS)] != plain["tokens"][: len(FACTS)]
                best = max(edited["tokens_per_second"]) / max(plain["tokens_per_second"])
                entry["throughput_ratio_best_round"] = best
            report["modes"][mode] = entry
            print(json.dumps({mode: {k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items()
                                                                            if kk not in ("tokens", "traceback")})
                                     for k, v in entry.items()}}, indent=1), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
