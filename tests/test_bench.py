"""`memserve bench throughput` at tiny size: it runs end to end and writes the contract's fields.
No timing asserts (benchmarks are not tests). Offline path only: an HTTP server start alone takes ~45 s."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]


def test_synthetic_store_adds_edits_on_top_of_the_real_ones(tmp_path):
    from memserve.bench import KEYS_PER_EDIT, synthetic_store
    from memserve.serving.testing import cached_store
    from memserve.store import Store

    info = synthetic_store(cached_store(24), 30, tmp_path / "s")
    assert info["real_edits"] == 24 and info["synthetic_edits"] == 6
    with Store.open(tmp_path / "s") as store:
        assert store.num_edits == 30 and store.verify() == []
        keys, owners = store.routing_keys(store.manifest["intermediate_size"])
        assert (owners == 29).sum() == KEYS_PER_EDIT and keys[-1].sum() == store.manifest["config"]["top_k"]
    with pytest.raises(ValueError, match="below"):
        synthetic_store(cached_store(24), 10, tmp_path / "t")


def test_bench_throughput_tiny(tmp_path):
    from typer.testing import CliRunner

    from memserve.cli.main import app

    out = tmp_path / "t.json"
    result = CliRunner().invoke(app, [
        "bench", "throughput", "--edits", "0,30", "--modes", "offline", "--requests", "4", "--max-tokens", "4",
        "--rounds", "1", "--hf-requests", "2", "--system-prompt", "--caching-off", "--json", str(out),
        "--plot", str(tmp_path / "t.png"),
    ])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [r["edits"] for r in rows] == [0, 30]
    for row in rows:
        for field in ("output_tok_s", "unedited_output_tok_s", "ratio", "transformers_bs1_output_tok_s"):
            assert row[field] > 0
        assert {"latency_p50_s", "latency_p99_s", "startup_s", "routed_edit"} <= set(row["offline"])
    assert rows[1]["synthetic"] and rows[1]["store_bytes_per_edit"] > 0
    assert rows[1]["offline"]["routed_edit"] > 0  # the real edits of the base store are hit
    # the system prompt is read from the prefix cache with and without edits; caching off is measured
    assert rows[1]["offline"]["cached_prompt_tokens_mean"] >= 128 and rows[1]["offline"]["unedited_cached_prompt_tokens_mean"] >= 128
    assert rows[1]["offline"]["vs_caching_off"]["ratio"] > 0 and "vs_caching_off" not in rows[0]["offline"]
    baseline = rows[0]["transformers_bs1_by_dtype"]["float32"]
    assert baseline["min"] <= baseline["median"] <= baseline["max"] and len(baseline["requests_tok_s"]) == 2
    assert rows[0]["run"]["system_prompt_tokens"] >= 200
    assert (tmp_path / "t.png").stat().st_size > 0
