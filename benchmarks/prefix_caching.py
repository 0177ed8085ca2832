"""Edits with prefix caching on, on the workload where caching pays: 64 chat requests behind one
~210-token system prompt, half asking edited facts. For each edit count: the edited engine vs plain
vLLM (no store), both with prefix caching on, in ABBA pairs; and the edited engine with caching on vs
the same store with caching off. The 0-edit point is the unedited engine against itself: the noise
floor of every ratio. Library: `memserve/bench.py` (`memserve bench throughput --system-prompt
--caching-off`); extra options are passed on (e.g. `--method wise`, `--facts FILE`).

    .venv/bin/python benchmarks/prefix_caching.py --json benchmarks/results/prefix_caching_memoir.json \
        --plot benchmarks/results/prefix_caching_memoir.png
"""

from __future__ import annotations

import sys

DEFAULTS = ["--system-prompt", "--caching-off", "--edits", "0,24", "--modes", "offline", "--requests", "64",
            "--max-tokens", "32", "--rounds", "4", "--hf-requests", "0"]

if __name__ == "__main__":  # vLLM engines run in spawned processes, which re-import this file
    from memserve.cli.main import app

    sys.exit(app(["bench", "throughput", *DEFAULTS, *sys.argv[1:]], prog_name="benchmarks/prefix_caching.py"))
