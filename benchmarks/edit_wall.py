"""Wall time per edit of a stream, from a store's records: each record keeps its commit time, its
training seconds and steps, so the gap between two consecutive commits is one edit's whole cost
(training, commit, bookkeeping). Edits up to `--from` are left out: `benchmarks/quality.py`
evaluates after edits 1, 10 and 100, and those gaps would include the evaluations.

    .venv/bin/python benchmarks/quality.py --dataset zsre --T 1,10,100,all --keep-store /tmp/zsre-store --json ...
    .venv/bin/python benchmarks/edit_wall.py --store /tmp/zsre-store --json benchmarks/results/edit_wall_zsre_memoir.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from memserve.store import Store


def edit_wall(records: list[dict], first: int) -> dict:
    """Statistics of the edits after edit `first` (0-based id): each one's wall is the gap from the
    commit before it, so the first gap timed starts at edit `first`'s commit."""
    timed = [(before, after) for before, after in zip(records, records[1:]) if before["id"] >= first]
    if not timed:
        raise SystemExit(f"no edits after edit {first} in this store ({len(records)} edits)")
    walls = [after["time"] - before["time"] for before, after in timed]
    train = [after["seconds"] for _, after in timed]
    hundreds = {}
    for wall, (_, after) in zip(walls, timed):
        hundreds.setdefault(after["id"] // 100 * 100, []).append((wall, after))
    return {
        "edits_timed": len(walls),
        "wall_seconds_per_edit_mean": statistics.mean(walls),
        "projected_wall_seconds_1000_edits": 1000 * statistics.mean(walls),
        "train_seconds_mean": statistics.mean(train),
        "train_seconds_median": statistics.median(train),
        "overhead_seconds_median": statistics.median(w - t for w, t in zip(walls, train)),
        "steps_mean": statistics.mean(after["steps"] for _, after in timed),
        "unconverged_edits": sum(not record.get("converged", True) for record in records),
        "restarted_edits": sum(bool(record.get("restarted")) for record in records),
        "per_hundred": [
            {"from": start + 1, "wall_mean": statistics.mean(w for w, _ in rows),
             "train_median": statistics.median(r["seconds"] for _, r in rows),
             "steps_mean": statistics.mean(r["steps"] for _, r in rows)}
            for start, rows in sorted(hundreds.items())
        ],
        "edits": [{"id": r["id"], "time": r["time"], "train_seconds": r["seconds"], "steps": r["steps"], "loss": r["loss"],
                   "converged": r.get("converged", True), "restarted": bool(r.get("restarted"))} for r in records],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--from", dest="first", type=int, default=100, help="time the edits after this one (0-based id)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    with Store.open(args.store, readonly=True) as store:
        records = list(store.records())
    result = {"store": str(args.store), "first_edit_timed": args.first, **edit_wall(records, args.first)}
    print(json.dumps({k: v for k, v in result.items() if k not in ("edits", "per_hundred")}, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
