"""Sequential-editing quality on the dev sets (the papers' protocol): edit T facts in one stream,
then evaluate every one of them on the final model. Several T share one stream: editing is
sequential and deterministic, so the memory after the first T edits of a longer stream is the memory
of a T-edit stream. Writes JSON (and a PNG when several T are run).

    .venv/bin/python benchmarks/quality.py --dataset zsre --method memoir --T 1,10,100,all \
        --json benchmarks/results/quality_zsre_memoir.json --plot benchmarks/results/quality_zsre_memoir.png

Datasets (`benchmarks/data/`): `zsre` edits `zsre_train_1k.jsonl` and probes specificity with the
questions of `zsre_dev.jsonl` (same templates, other subjects, never edited: share reaching an edit,
answers unchanged); `counterfact`'s Loc is its neighbourhood prompts; `zsre_dev`, `hallucination`,
`temporal` as shipped. Every row carries the worst single fact next to the means. `--vllm` also
evaluates the longest stream through the vLLM engine (the served model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from memserve.bench import store_bytes
from memserve.editor import open_session
from memserve.evaluate import HFBackend, evaluate, evaluate_store
from memserve.facts import read_facts
from memserve.machine import describe

DATA = Path(__file__).resolve().parent / "data"  # shipped with the repository (data/README.md)
# dataset -> (edit stream, questions nobody edits: same-source specificity probes or None). For
# CounterFact the specificity probes are its own neighbourhood locality prompts (the Loc column).
DATASETS = {
    "zsre": ("zsre_train_1k.jsonl", "zsre_dev.jsonl"),
    "zsre_dev": ("zsre_dev.jsonl", None),
    "counterfact": ("counterfact_dev.jsonl", None),
    "hallucination": ("hallucination_dev.jsonl", None),
    "temporal": ("temporal_dev.jsonl", None),
}


def run(dataset: str, method: str, counts: list[int | None], config: dict, generation: bool, vllm: bool,
        offset: int = 0, probes_limit: int | None = None, keep_store: Path | None = None) -> list[dict]:
    stream, probe_file = DATASETS[dataset]
    facts, invalid = read_facts(DATA / stream, skip_invalid=True)
    facts = facts[offset:]
    probes = read_facts(DATA / probe_file, skip_invalid=True)[0][:probes_limit] if probe_file else []
    stops = sorted({min(c or len(facts), len(facts)) for c in counts})
    workdir = Path(tempfile.mkdtemp(prefix="memserve-quality-"))
    rows, seconds, losses, done, edit_wall, unconverged = [], [], [], 0, 0.0, 0
    try:
        runner = open_session(workdir / "store", method=method, config=config or None, facts=facts[: stops[-1]])
        started = time.perf_counter()
        for stop in stops:
            applied = time.perf_counter()
            report = runner.apply(facts[done:stop])
            edit_wall += time.perf_counter() - applied
            unconverged += report.unconverged
            done = stop
            seconds += report.seconds
            losses += report.losses
            edit_seconds = time.perf_counter() - started
            ids = [runner.store.find(f.key) for f in facts[:stop]]
            result = evaluate(runner.edited, HFBackend(runner.edited), facts[:stop], ids, generation=generation,
                              unedited=probes)
            result.update(
                dataset=dataset, stream=stream, offset=offset, method=method, T=stop,
                invalid_rows_skipped=len(invalid), config=runner.edited.memory.config.to_dict(),
                seconds_per_edit_median=statistics.median(seconds),
                seconds_per_edit_p90=sorted(seconds)[int(0.9 * (len(seconds) - 1))], edit_seconds_total=edit_seconds,
                edit_wall_seconds=edit_wall,  # the edits alone (training and commits); the total includes evaluations
                final_loss_mean=statistics.mean(losses), unconverged_edits=unconverged, store_bytes=store_bytes(workdir / "store"), machine=describe(),
            )
            rows.append(result)
            print(json.dumps(summary(result)), flush=True)
        runner.store.close()
        if vllm:
            served = evaluate_store(workdir / "store", facts[: stops[-1]], backend="vllm", generation=generation,
                                    unedited=probes)
            rows[-1]["vllm"] = served
            print(json.dumps({"vllm": summary(served)}), flush=True)
        if keep_store is not None:
            shutil.move(workdir / "store", keep_store)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def summary(row: dict) -> dict:
    keys = ("dataset", "method", "T", "rel", "gen", "loc", "ppl", "gen_acc", "gen_exact", "seconds_per_edit_median",
            "store_bytes")
    out = {k: row[k] for k in keys if k in row}
    out["routing"] = row["routing"]
    out["worst"] = row["worst"]
    if "unedited" in row:
        out["unedited"] = row["unedited"]
    if "chat" in row:
        chat = row["chat"]
        out["chat"] = {k: chat[k] for k in ("rel", "gen", "loc", "ppl", "gen_acc", "gen_exact", "unedited") if k in chat}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="zsre", choices=list(DATASETS))
    parser.add_argument("--offset", type=int, default=0, help="skip the stream's first rows (out-of-sample runs)")
    parser.add_argument("--probes", type=int, default=None, help="use only the first N unedited probes")
    parser.add_argument("--method", default="memoir", choices=["memoir", "wise"])
    parser.add_argument("--T", default="all", help="comma-separated stream lengths, 'all' = every valid fact")
    parser.add_argument("--set", action="append", default=[], help="method option key=value (JSON value)")
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--vllm", action="store_true", help="also evaluate the longest stream through vLLM")
    parser.add_argument("--keep-store", type=Path, help="move the longest stream's store here (must not exist)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    config = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    counts = [None if t == "all" else int(t) for t in args.T.split(",")]
    if args.keep_store is not None and args.keep_store.exists():
        parser.error(f"--keep-store {args.keep_store}: already exists")
    rows = run(args.dataset, args.method, counts, config, not args.no_generation, args.vllm, args.offset, args.probes,
               args.keep_store)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    if args.plot and len(rows) > 1:
        plot(rows, args.plot, f"{args.method} on {args.dataset}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Rel/Gen/Loc (as written and as chat turns) and, where measured, the share of never-edited
    questions that reach an edit, against T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ts = [r["T"] for r in rows]
    for metric, color in (("rel", "C0"), ("gen", "C1"), ("loc", "C2")):
        ax.plot(ts, [r[metric] for r in rows], marker="o", color=color, label=metric)
        if all("chat" in r for r in rows):
            ax.plot(ts, [r["chat"][metric] for r in rows], marker="x", ls="--", color=color, label=f"{metric} (chat)")
    if all("unedited" in r for r in rows):
        ax.plot(ts, [r["unedited"]["reach_an_edit"] for r in rows], marker="s", color="C3", label="unedited reaching an edit")
        if all("unedited" in r.get("chat", {}) for r in rows):
            ax.plot(ts, [r["chat"]["unedited"]["reach_an_edit"] for r in rows], marker="s", ls="--", color="C3",
                    label="unedited reaching an edit (chat)")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("edits in one stream (T)")
    ax.set_ylabel("share, on the final model")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
