"""Seconds per edit: the optimised trainer (cached activations, answer-span-only upper layers,
target-only logits, bf16 products where the CPU has them) against the naive loop (full
forward/backward every step), side by side in one run on the same facts and the same model; and the
optimised trainer with its steps in fp32 (`step_dtype=float32`), to isolate what bf16 steps give.
Writes JSON and a PNG.

    .venv/bin/python benchmarks/edit_speed.py --method memoir --facts 20 --json out/edit_speed.json --plot out/edit_speed.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from memserve.editor import open_session
from memserve.facts import read_facts
from memserve.machine import describe

DATA = Path(__file__).resolve().parent / "data"  # shipped with the repository (data/README.md)


def time_edits(method: str, facts, naive: bool, config: dict | None = None) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="memserve-speed-"))
    try:
        runner = open_session(workdir / "store", method=method, config=config, facts=facts)
        report = runner.apply(facts, naive=naive)
        steps = [r["steps"] for r in runner.store.records()]
        size = sum(f.stat().st_size for f in (workdir / "store").iterdir())
        runner.store.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = sorted(report.seconds)
    return {
        "median_s": statistics.median(seconds), "p90_s": seconds[int(0.9 * (len(seconds) - 1))],
        "mean_steps": statistics.mean(steps), "seconds": report.seconds, "store_bytes": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="memoir", choices=["memoir", "wise"])
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    facts, _ = read_facts(DATA / "zsre_dev.jsonl", skip_invalid=True)
    facts = facts[: args.facts]
    fast = time_edits(args.method, facts, naive=False)
    fast_fp32 = time_edits(args.method, facts, naive=False, config={"step_dtype": "float32"})
    naive = time_edits(args.method, facts, naive=True)
    result = {
        "method": args.method, "facts": len(facts), "fast": fast, "fast_fp32_steps": fast_fp32, "naive": naive,
        "speedup_median": naive["median_s"] / fast["median_s"],
        "bf16_steps_speedup_median": fast_fp32["median_s"] / fast["median_s"],
        "store_bytes_per_edit": fast["store_bytes"] / len(facts),
        "machine": {**describe(), "torch_threads": torch.get_num_threads()},
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("fast", "fast_fp32_steps", "naive")} | {
        "fast_median_s": fast["median_s"], "fast_p90_s": fast["p90_s"], "fast_fp32_steps_median_s": fast_fp32["median_s"],
        "naive_median_s": naive["median_s"]}))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.boxplot([fast["seconds"], fast_fp32["seconds"], naive["seconds"]],
                   tick_labels=["optimised", "optimised, fp32 steps", "naive loop"])
        ax.set_ylabel("seconds per edit")
        ax.set_title(f"{args.method}: {len(facts)} ZsRE edits, speed-up x{result['speedup_median']:.1f} (median)")
        fig.tight_layout()
        fig.savefig(args.plot)


if __name__ == "__main__":
    main()
