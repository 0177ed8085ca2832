"""Serving throughput under 0 / 100 / 1000 / 10,000 edits against the unedited engine of the same run
(offline engine and HTTP server), plus the transformers batch-1 baseline. Writes JSON and a PNG.
Library: `memserve/bench.py`; same as `memserve bench throughput`.

    .venv/bin/python benchmarks/throughput.py --edits 0,100,1000,10000 --json benchmarks/results/throughput.json --plot benchmarks/results/throughput.png
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # vLLM engines run in spawned processes, which re-import this file
    from memserve.cli.main import app

    sys.exit(app(["bench", "throughput", *sys.argv[1:]], prog_name="benchmarks/throughput.py"))
