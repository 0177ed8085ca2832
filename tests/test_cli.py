"""`memserve edit/eval/store` end to end: good runs, resumability, and bad input leaving the store alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memserve.cli.main import app

from .conftest import FACTS, tiny_config, write_facts

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def settings(**extra):
    out = []
    for key, value in tiny_config(**extra).items():
        out += ["--set", f"{key}={json.dumps(value)}"]
    return out


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("cli")
    facts = write_facts(base / "facts.jsonl", FACTS[:2])
    result = invoke("edit", facts, "--store", base / "store", "--model", tiny_model_dir, *settings(steps=5))
    assert result.exit_code == 0, result.output
    return base, facts


def store_state(path: Path) -> bytes:
    return (path / "data.mdb").read_bytes()


def test_edit_is_resumable_and_store_commands_work(tiny_store, tiny_model_dir):
    base, facts = tiny_store
    result = invoke("edit", facts, "--store", base / "store")
    assert result.exit_code == 0 and "0 edits added, 2 already stored" in result.output
    info = json.loads(invoke("store", "info", "--store", base / "store", "--json").output)
    assert info["edits"] == 2 and info["method"] == "memoir" and info["version"] == 2 and info["model"] == str(tiny_model_dir.resolve())
    assert invoke("store", "verify", "--store", base / "store").exit_code == 0
    assert "Mombasa" in invoke("store", "show", "0", "--store", base / "store").output
    assert invoke("store", "show", "7", "--store", base / "store").exit_code != 0


@pytest.mark.parametrize("stop_loss, converged", [(100.0, True), (0.02, False)])
def test_an_edit_that_does_not_reach_its_stop_loss_is_reported(tmp_path, tiny_model_dir, stop_loss, converged):
    """A random tiny model never gets an answer's loss near 0.02 in 2 steps; a stop loss of 100 it
    reaches at once."""
    facts = write_facts(tmp_path / "facts.jsonl", FACTS[:1])
    result = invoke("edit", facts, "--store", tmp_path / "store", "--model", tiny_model_dir, *settings(steps=2, stop_loss=stop_loss))
    assert result.exit_code == 0, result.output
    record = json.loads(invoke("store", "show", "0", "--store", tmp_path / "store").output)["record"]
    assert record["converged"] is converged and record["steps"] == (1 if converged else 2)
    assert ("did not reach its stop loss in 2 steps" in result.output) is not converged


def test_eval_writes_contract_json(tiny_store, tmp_path):
    base, facts = tiny_store
    out = tmp_path / "m.json"
    result = invoke("eval", facts, "--store", base / "store", "--json", out, "--no-generation")
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["n"] == 2 and metrics["method"] == "memoir" and metrics["backend"] == "hf"
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("rel", "gen", "loc"))


@pytest.mark.parametrize("rows, message", [
    (['{"prompt": "What is x?", "target": "y"}', '{"prompt": "broken"'], "facts.jsonl:2: malformed JSON"),
    (['{"target": "y"}'], "facts.jsonl:1: missing field 'prompt'"),
    (['{"prompt": "What is x?", "target": ""}'], "facts.jsonl:1: field 'target' is empty"),
    (['{"prompt": "What is x?", "target": "y"}', json.dumps({"prompt": "word " * 400, "target": "y"})], "facts.jsonl:2: field 'prompt'"),
])
def test_bad_input_is_refused_and_store_unchanged(tiny_store, tmp_path, rows, message):
    base, _ = tiny_store
    before = store_state(base / "store")
    bad = write_facts(tmp_path / "facts.jsonl", rows)
    result = invoke("edit", bad, "--store", base / "store")
    assert result.exit_code != 0
    assert message in result.output.replace("\n", "")
    assert store_state(base / "store") == before


def test_store_for_another_model_or_method_is_refused(tiny_store, tmp_path, default_model_dir):
    base, facts = tiny_store
    before = store_state(base / "store")
    result = invoke("edit", facts, "--store", base / "store", "--model", default_model_dir)
    assert result.exit_code != 0 and "built for model" in result.output
    result = invoke("edit", facts, "--store", base / "store", "--method", "wise")
    assert result.exit_code != 0 and "holds memoir edits" in result.output
    assert store_state(base / "store") == before


def test_relation_check_is_off_where_no_relation_key_ships_and_asking_for_it_is_refused(tiny_store, tmp_path, tiny_model_dir):
    base, facts = tiny_store
    info = json.loads(invoke("store", "info", "--store", base / "store", "--json").output)
    assert info["config"]["relation_check"] is False  # the default resolved for a model without a key
    result = invoke("edit", facts, "--store", tmp_path / "store", "--model", tiny_model_dir, *settings(relation_check=True))
    assert result.exit_code != 0 and sum("no relation key ships for" in line for line in result.output.splitlines()) == 1
    assert not (tmp_path / "store").exists()


def test_skip_invalid_edits_good_rows(tmp_path, tiny_model_dir):
    facts = write_facts(tmp_path / "facts.jsonl", [FACTS[0], '{"prompt": "x"}'])
    result = invoke("edit", facts, "--store", tmp_path / "s", "--model", tiny_model_dir, "--skip-invalid", *settings(steps=2))
    assert result.exit_code == 0, result.output
    assert "facts.jsonl:2: missing field 'target'" in result.output.replace("\n", "")
    assert "1 edits added" in result.output


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "memserve"
    assert exe.exists()
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    assert out.returncode == 0 and "edit" in out.stdout and "serve" in out.stdout


def test_route_explains_the_decision_with_the_nearest_edits(tiny_store):
    from .conftest import FACTS

    base, _ = tiny_store
    result = invoke("route", FACTS[1]["prompt"], "--store", base / "store", "--top", "2", "--json")
    assert result.exit_code == 0, result.output
    explained = json.loads(result.stdout)
    # an edited question reaches its own edit, which is the nearest and passes the threshold
    assert explained["route"] == 1 and explained["prompt"] == FACTS[1]["prompt"] and explained["target"] == FACTS[1]["target"]
    first = explained["candidates"][0]
    assert len(explained["candidates"]) == 2 and first["route"] == 1 and first["passes"] and first["score"] == explained["score"]
    assert explained["candidates"][1]["score"] <= first["score"]
    table = invoke("route", FACTS[1]["prompt"], "--store", base / "store")
    assert table.exit_code == 0 and "decision: edit-1" in table.output
    assert invoke("route", "Q?", "--store", base / "missing").exit_code != 0


def test_store_log_and_show_say_who_changed_what_and_what_an_edit_may_be_confused_with(tmp_path, tiny_model_dir):
    import socket

    facts = write_facts(tmp_path / "facts.jsonl", FACTS[:2])
    store = tmp_path / "store"
    assert invoke("edit", facts, "--store", store, "--model", tiny_model_dir, *settings(steps=3)).exit_code == 0
    assert invoke("store", "rollback", "--to", "1", "--store", store).exit_code == 0
    log = json.loads(invoke("store", "log", "--store", store, "--json").output)
    edits = [e for e in log if e["op"] == "edit"]
    assert [e["record"]["source"] for e in edits] == [f"{facts}:1", f"{facts}:2"]
    assert all(e["record"]["by"]["host"] == socket.gethostname() and e["record"]["by"]["command"].startswith("memserve")
               for e in edits)
    assert log[-1]["op"] == "rollback" and log[-1]["to"] == 1 and log[-1]["by"]["user"]
    table = invoke("store", "log", "--store", store)
    assert table.exit_code == 0 and "rollback" in table.output  # (a narrow terminal wraps the cells)
    invoke("store", "rollback", "--to", "2", "--store", store)  # both edits current again
    shown = json.loads(invoke("store", "show", "0", "--store", store).output)
    assert shown["record"]["fact"]["prompt"] == FACTS[0]["prompt"]
    assert [n["edit"] for n in shown["nearest_edits"]] == [1] and 0 < shown["nearest_edits"][0]["overlap"] <= 1


def test_every_command_help_has_an_example():
    import typer.main

    def paths(group, prefix=()):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):  # a group
                yield from paths(command, (*prefix, name))
            else:
                yield (*prefix, name)

    found = list(paths(typer.main.get_command(app)))
    assert len(found) >= 15
    for path in found:
        result = invoke(*path, "--help")
        assert result.exit_code == 0 and "Example:" in result.output, path


def test_store_show_reads_the_edit_hit_count_from_a_server(tiny_store):
    """`store show ID --server URL` adds the edit's `memserve_edit_hits_total` from the server's
    /metrics (a local stand-in serving the exposition text), None when the edit is not exported."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'memserve_edit_hits_total{edit="edit-1"} 7.0\nmemserve_edit_hits_total{edit="edit-11"} 3.0\n'
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base, _ = tiny_store
        url = f"http://127.0.0.1:{server.server_port}"
        assert json.loads(invoke("store", "show", "1", "--store", base / "store", "--server", url).stdout)["hits"] == 7.0
        assert json.loads(invoke("store", "show", "0", "--store", base / "store", "--server", url).stdout)["hits"] is None
    finally:
        server.shutdown()
