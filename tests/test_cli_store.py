"""Bad input through `memserve edit` (one-line error naming file/line/field, non-zero exit, store
unchanged by content digest) and the store operations (versions, rollback, export, import)."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memserve.store import Store

from .conftest import FACTS, write_facts
from .test_cli import invoke, tiny_store  # noqa: F401 (fixture)

MEMSERVE = Path(sys.executable).parent / "memserve"


@pytest.fixture(scope="module")
def store2(tiny_store):  # noqa: F811 (the imported fixture)
    """A tiny-model store with two edits; tests copy it before changing it."""
    return tiny_store[0] / "store"


def digest(store: Path) -> str:
    with Store.open(store) as opened:
        return opened.digest()


def error_line(output: str) -> str:
    """The one error line (the command must print exactly one)."""
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


HUGE = "word " * 400


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": 7, "target": "y"}\n', "facts.jsonl:1: field 'prompt' must be a string, got int"),
    (b'{"prompt": "Q?", "target": ["y"]}\n', "facts.jsonl:1: field 'target' must be a string, got list"),
    (b'{"prompt": "Q?", "target": "y", "rephrases": {"a": 1}}\n', "facts.jsonl:1: field 'rephrases' must be a string or a list of strings"),
    (b'{"prompt": "Q?", "target": "y", "locality": "x"}\n', "facts.jsonl:1: field 'locality' must be a list"),
    (b'{"prompt": "Q?", "target": "y", "locality": [{"prompt": "P"}]}\n', "facts.jsonl:1: missing field 'locality[0].answer'"),
    (b'["Q?", "y"]\n', "facts.jsonl:1: expected a JSON object, got list"),
    (b'{"prompt": "Q?", "target": "y"}\n{"src": "Q2?"}\n', "facts.jsonl:2: missing field 'target'"),
    (b'{"prompt": "   ", "target": "y"}\n', "facts.jsonl:1: field 'prompt' is empty"),
    (b'{"prompt": "Q?", "target": "y"}\n{"prompt": "Q2?", "target": "y"\n', "facts.jsonl:2: malformed JSON"),
    (b'{"prompt": "Q?", "target": "y"}\n{"prompt": "caf\xe9?", "target": "y"}\n', "facts.jsonl:2: not valid UTF-8 (byte 15)"),
    (b'\n\n', "facts.jsonl: no facts in file"),
    (b'{"prompt": "Q?", "target": "y"}\n' + json.dumps({"prompt": "Q?", "target": HUGE}).encode() + b"\n", "facts.jsonl:2: field 'prompt': prompt + target is"),
])
def test_bad_rows_are_refused_with_one_line_and_store_unchanged(store2, tmp_path, content, message):
    before = digest(store2)
    (tmp_path / "facts.jsonl").write_bytes(content)
    result = invoke("edit", tmp_path / "facts.jsonl", "--store", store2)
    assert result.exit_code != 0 and message in error_line(result.output)
    assert digest(store2) == before


def test_missing_file_another_layer_or_method_are_refused(store2, tmp_path):
    before = digest(store2)
    facts = write_facts(tmp_path / "facts.jsonl", FACTS[2:])
    for args, message in (
        ((tmp_path / "none.jsonl",), "none.jsonl: cannot read: No such file or directory"),
        ((facts, "--layer", "1"), "options are fixed when a store is created; differing: {'layer': 1}"),
        ((facts, "--method", "wise"), "store holds memoir edits, not wise"),
    ):
        result = invoke("edit", *args, "--store", store2)
        assert result.exit_code != 0 and message in error_line(result.output)
    assert digest(store2) == before


def test_duplicate_and_conflicting_facts(store2, tmp_path, tiny_model_dir):
    """The same fact twice is stored once; the same prompt with a new target is a new edit that
    supersedes the old one and wins its routing (newest edit on ties)."""
    from memserve.editor import open_session
    from memserve.facts import read_facts

    store = tmp_path / "store"
    shutil.copytree(store2, store)
    conflict = {**FACTS[0], "target": "Nairobi"}
    facts = write_facts(tmp_path / "facts.jsonl", [FACTS[2], FACTS[2], conflict])
    result = invoke("edit", facts, "--store", store)
    assert result.exit_code == 0, result.output
    assert "facts.jsonl:2: already stored as edit 2" in result.output
    assert "facts.jsonl:3: committed edit 3 (version 4, supersedes edit 0)" in result.output
    assert "2 edits added, 1 already stored" in result.output
    runner = open_session(store, create=False)
    try:
        assert runner.store.num_edits == 4 and runner.store.record(3)["supersedes"] == 0
        (fact,), _ = read_facts(write_facts(tmp_path / "one.jsonl", [conflict]))
        edited = runner.edited
        _, routes = edited.logits([edited.encode(fact.prompt + " " + fact.target)], [len(edited.encode(fact.prompt))])
        assert routes.tolist() == [3]
    finally:
        runner.store.close()


def test_edit_session_refuses_to_commit_over_a_concurrent_change(store2, tmp_path):
    """A rollback (or another editor) after this session loaded its memory: committing that memory
    would silently undo the other change, so the commit is refused."""
    from memserve.editor import open_session
    from memserve.facts import Fact
    from memserve.store import StoreError

    store = tmp_path / "store"
    shutil.copytree(store2, store)
    runner = open_session(store, create=False)
    try:
        runner.store.rollback(1)
        before = runner.store.digest()
        with pytest.raises(StoreError, match="moved to version 3"):
            runner.apply([Fact(prompt=FACTS[2]["prompt"], target=FACTS[2]["target"])])
        assert runner.store.digest() == before
    finally:
        runner.store.close()


def test_skip_invalid_edits_good_rows_and_lists_bad_ones(store2, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(store2, store)
    facts = tmp_path / "facts.jsonl"
    facts.write_bytes(b'{"prompt": "Q\xff"}\n' + json.dumps(FACTS[2]).encode() + b'\n{"prompt": ""}\n[1]\n')
    result = invoke("edit", facts, "--store", store, "--skip-invalid")
    assert result.exit_code == 0, result.output
    output = result.output
    for line in ("facts.jsonl:1: not valid UTF-8", "facts.jsonl:3: field 'prompt' is empty", "facts.jsonl:4: expected a JSON object"):
        assert f"skipped: {tmp_path}/{line}" in output
    assert "1 edits added, 0 already stored, 3 invalid rows skipped" in output


# --- a read-only directory and a full disk, for real, in a private mount namespace ----------------
def namespace_available() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True).returncode == 0


needs_namespace = pytest.mark.skipif(not namespace_available(), reason="needs unprivileged mount namespaces (unshare -rm)")


def in_namespace(script: str) -> str:
    """Run a shell script as root of a new user + mount namespace (mounts vanish with it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=300)
    return done.stdout + done.stderr


@needs_namespace
def test_read_only_store_directory(store2, tmp_path):
    """The store directory is bind-mounted read-only: edits are refused, reading still works."""
    store = tmp_path / "store"
    shutil.copytree(store2, store)
    before = digest(store)
    facts = write_facts(tmp_path / "facts.jsonl", FACTS[2:])
    s, m = shlex.quote(str(store)), shlex.quote(str(MEMSERVE))
    output = in_namespace(
        f"mount --bind {s} {s} && mount -o remount,ro,bind {s} && "
        f"{m} edit {shlex.quote(str(facts))} --store {s}; echo edit-exit=$?; {m} store verify --store {s}"
    )
    assert "edit-exit=2" in output and "Read-only file system" in error_line(output)
    assert "ok: 2 edits, version 2" in output
    assert digest(store) == before


@needs_namespace
def test_full_disk(store2, tmp_path):
    """The store lives on a tmpfs filled to the last byte, so its commit gets a real ENOSPC."""
    compact = tmp_path / "compact"  # no free pages: any commit must grow the file
    compact.mkdir()
    with Store.open(store2) as opened:
        opened.env.copy(str(compact), compact=True)
        before = opened.digest()
    facts = write_facts(tmp_path / "facts.jsonl", FACTS[2:])
    disk, m = tmp_path / "disk", shlex.quote(str(MEMSERVE))
    disk.mkdir()
    d, store = shlex.quote(str(disk)), shlex.quote(str(disk / "store"))
    check = f"from memserve.store import Store; print('digest', Store.open({str(disk / 'store')!r}).digest())"
    output = in_namespace(
        f"mount -t tmpfs -o size=4m tmpfs {d} && cp -r {shlex.quote(str(compact))} {store} && {m} store info --store {store} >/dev/null && "
        f"(dd if=/dev/zero of={d}/filler bs=1k 2>/dev/null; true) && {m} edit {shlex.quote(str(facts))} --store {store}; echo edit-exit=$?; "
        f"rm {d}/filler; {shlex.quote(sys.executable)} -c {shlex.quote(check)}; {m} store verify --store {store}"
    )
    assert "edit-exit=2" in output and "No space left on device" in error_line(output)
    assert f"digest {before}" in output and "ok: 2 edits, version 2" in output


# --- store operations -----------------------------------------------------------------------------
def test_versions_rollback_export_import(store2, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(store2, store)
    with Store.open(store) as opened:
        tensors_at_2 = opened.tensors()
    assert invoke("edit", write_facts(tmp_path / "f.jsonl", FACTS[2:]), "--store", store).exit_code == 0
    info = json.loads(invoke("store", "info", "--json", "--store", store).output)
    assert info["edits"] == 3 and info["version"] == 3 and info["history_from"] == 0
    result = invoke("store", "rollback", "--to", "2", "--store", store)
    assert result.exit_code == 0 and "version 4: the edits and memory of version 2 (2 edits)" in result.output
    with Store.open(store) as opened:
        assert opened.num_edits == 2 and all(torch.equal(opened.tensors()[n], t) for n, t in tensors_at_2.items())
    versions = invoke("store", "versions", "--store", store).output
    assert "rollback to 2" in versions and "4*" in versions
    assert invoke("store", "verify", "--store", store).exit_code == 0
    result = invoke("store", "rollback", "--to", "9", "--store", store)
    assert result.exit_code != 0 and "version 9 is not an earlier version (current: 4)" in error_line(result.output)

    result = invoke("store", "export", tmp_path / "s.tar", "--store", store)
    assert result.exit_code == 0 and "2 edits, version 4" in result.output
    result = invoke("store", "import", tmp_path / "s.tar", "--store", tmp_path / "imported")
    assert result.exit_code == 0, result.output
    assert digest(tmp_path / "imported") == digest(store)
    assert invoke("store", "rollback", "--to", "3", "--store", tmp_path / "imported").exit_code == 0
    assert json.loads(invoke("store", "info", "--json", "--store", tmp_path / "imported").output)["edits"] == 3
    result = invoke("store", "import", tmp_path / "s.tar", "--store", tmp_path / "imported")
    assert result.exit_code != 0 and "a store already exists here" in error_line(result.output)
    result = invoke("store", "import", tmp_path / "f.jsonl", "--store", tmp_path / "other")
    assert result.exit_code != 0 and "not a memserve store export" in error_line(result.output)

    result = invoke("store", "compact", "--keep-versions", "2", "--store", store)
    assert result.exit_code == 0 and "history kept from version 3 (current 4): 3 older versions dropped" in result.output
    assert invoke("store", "verify", "--store", store).exit_code == 0
    result = invoke("store", "rollback", "--to", "2", "--store", store)
    assert result.exit_code != 0 and "predates the kept history (from version 3)" in error_line(result.output)
    assert invoke("store", "rollback", "--to", "3", "--store", store).exit_code == 0


def test_real_model_store_rollback_and_export(tmp_path):
    """On a copy of the cached real store (default model): one more real edit, rolled back to the
    exact memory before it; the export imports to the same content and loads."""
    from memserve.editor import load_memory, open_session
    from memserve.facts import Fact
    from memserve.serving.testing import cached_store

    store = tmp_path / "store"
    shutil.copytree(cached_store(24), store)
    with Store.open(store) as opened:
        version, tensors, keys = opened.version, opened.tensors(), opened.routing_keys(opened.manifest["intermediate_size"])
    runner = open_session(store, create=False)
    try:
        runner.apply([Fact(prompt="Who founded the city of Zorbania?", target="Queen Alethra")])
        assert runner.store.num_edits == 25
        runner.store.rollback(version)
        m = runner.store.manifest
        assert all(torch.equal(runner.store.tensors()[n], t) for n, t in tensors.items()) and runner.store.num_edits == 24
        assert all(torch.equal(a, b) for a, b in zip(runner.store.routing_keys(m["intermediate_size"]), keys))
        assert runner.store.verify(width=m["intermediate_size"]) == []
        runner.store.export(tmp_path / "real.tar")
        expected = runner.store.digest()
    finally:
        runner.store.close()
    with Store.import_file(tmp_path / "real.tar", tmp_path / "imported") as imported:
        assert imported.digest() == expected
        memory = load_memory(imported, torch.zeros(m["hidden_size"], m["intermediate_size"]))
        assert memory.num_edits == 24
