"""LMDB + FAISS store: atomic commits, refusal of foreign models, verification."""

import json
import re
from pathlib import Path

import lmdb
import pytest
import torch

from memserve.store import Store, StoreError, StoreMismatchError, content_hash

MANIFEST = {"model": "m", "layer": 2, "method": "memoir", "config": {}, "weight_hash": "abc", "intermediate_size": 64}


def record(i):
    fact = {"prompt": f"p{i}", "target": f"t{i}"}
    return {"fact_key": f"k{i}", "fact": fact, "content_hash": content_hash(fact), "loss": 0.1, "steps": 3, "seconds": 0.5}


def test_commit_read_back_and_nearest(tmp_path):
    store = Store.create(tmp_path / "s", MANIFEST, {"residual": torch.zeros(2, 2)})
    keys = torch.zeros(3, 64, dtype=torch.bool)
    for i in range(3):
        keys[i, i * 10 : i * 10 + 16] = True
        assert store.commit_edit(record(i), keys[i], {"residual": torch.full((2, 2), float(i))}) == i
    store.close()
    store = Store.open(tmp_path / "s", readonly=True)
    assert store.num_edits == 3 and store.version == 3
    assert store.find("k1") == 1 and store.find("nope") is None
    assert torch.equal(store.keys(64), keys)
    assert torch.equal(store.tensors()["residual"], torch.full((2, 2), 2.0))
    assert [r["fact"]["prompt"] for r in store.records()] == ["p0", "p1", "p2"]
    assert store.nearest(keys[1], 2)[0] == (1, 16)
    assert store.verify(width=64) == []


def test_failed_commit_leaves_store_unchanged(tmp_path):
    store = Store.create(tmp_path / "s", MANIFEST)
    store.commit_edit(record(0), None, {"residual": torch.zeros(2)})
    with pytest.raises(Exception):
        # The record is written first; the bad tensor fails afterwards inside the same transaction.
        store.commit_edit(record(1), None, {"residual": "not a tensor"})
    assert store.num_edits == 1 and store.version == 1 and store.find("k1") is None
    assert torch.equal(store.tensors()["residual"], torch.zeros(2))
    assert store.verify() == []


def test_foreign_model_or_layer_is_refused(tmp_path):
    store = Store.create(tmp_path / "s", MANIFEST)
    store.check_compatible("m", "abc", 2)
    with pytest.raises(StoreMismatchError, match="built for model m"):
        store.check_compatible("other", "xyz")
    with pytest.raises(StoreMismatchError, match="layer 2, not layer 5"):
        store.check_compatible("m", "abc", 5)


def test_verify_detects_tampering(tmp_path):
    store = Store.create(tmp_path / "s", MANIFEST)
    store.commit_edit(record(0), None, {"residual": torch.zeros(3)})
    store.close()
    env = lmdb.open(str(tmp_path / "s"), max_dbs=8)
    with env.begin(write=True) as txn:
        db = env.open_db(b"records", txn=txn)
        key, value = next(iter(txn.cursor(db=db)))
        txn.put(key, value.replace(b'"p0"', b'"pX"'), db=db)
        tensors = env.open_db(b"tensors", txn=txn)
        txn.put(b"residual", b"garbage", db=tensors)
    env.close()
    problems = Store.open(tmp_path / "s").verify()
    assert any("checksum mismatch" in p for p in problems)
    assert any("tensor residual" in p for p in problems)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="no store here"):
        Store.open(tmp_path / "missing")
    with pytest.raises(StoreError, match="already exists"):
        Store.create(tmp_path / "s", MANIFEST)
        Store.create(tmp_path / "s", MANIFEST)


def test_bulk_commit_is_one_transaction_with_a_version_per_edit(tmp_path):
    store = Store.create(tmp_path / "s", MANIFEST, {"residual": torch.zeros(2)})
    store.commit_edit(record(0), None, {})
    keys = torch.zeros(3, 64, dtype=torch.bool)
    keys[:, :8] = True
    assert store.commit_edits([(record(i), keys[i - 1]) for i in range(1, 4)], {"residual": torch.ones(2)}) == [1, 2, 3]
    assert store.num_edits == 4 and store.version == 4
    assert [r["version"] for r in store.records()] == [1, 2, 3, 4]
    assert store.find("k3") == 3 and store.keys(64).shape == (3, 64)
    assert torch.equal(store.tensors()["residual"], torch.ones(2))
    with pytest.raises(Exception):
        store.commit_edits([(record(4), None), (record(5), None)], {"residual": "not a tensor"})
    assert store.num_edits == 4 and store.find("k4") is None
    assert store.verify(width=64) == []


# --- versions, rollback, export/import ------------------------------------------------------------
def column_edit(store, i, width=64):
    """Commit edit i changing column i of the residual (as a MEMOIR edit changes its mask's columns)."""
    residual = store.tensors()["residual"].clone()
    residual[:, i] = float(i + 1)
    key = torch.zeros(width, dtype=torch.bool)
    key[i : i + 8] = True
    return store.commit_edit({**record(i), "prompt_key": f"q{i % 3}"}, key, {"residual": residual})


def column_store(path, edits=4, by_column=("residual",)):
    store = Store.create(path, MANIFEST, {"residual": torch.zeros(32, 16), "background": torch.ones(16)}, by_column=by_column)
    for i in range(edits):
        column_edit(store, i)
    return store


@pytest.mark.parametrize("by_column", [("residual",), ()], ids=["by-column", "whole"])
def test_rollback_restores_tensors_records_and_keys_and_is_reversible(tmp_path, by_column):
    store = column_store(tmp_path / "s", by_column=by_column)
    tensors_at_4 = store.tensors()
    records_at_4, keys_at_4 = list(store.records()), store.keys(64)
    assert store.rollback(2) == 5
    assert store.num_edits == 2 and store.version == 5
    assert torch.equal(store.tensors()["residual"][:, :4], torch.tensor([1.0, 2.0, 0.0, 0.0]).expand(32, 4))
    assert [r["id"] for r in store.records()] == [0, 1] and store.keys(64).shape == (2, 64)
    assert store.find("k3") is None and store.verify(width=64) == []
    column_edit(store, 2)  # a new edit 2 on top of the rollback
    assert store.version == 6 and store.record(2)["version"] == 6
    assert store.rollback(4) == 7  # forward again: the rolled-back edits come back from the journal
    assert list(store.records()) == records_at_4 and torch.equal(store.keys(64), keys_at_4)
    assert all(torch.equal(store.tensors()[n], tensors_at_4[n]) for n in tensors_at_4)
    assert store.rollback(6) == 8 and store.record(2)["version"] == 6
    assert store.verify(width=64) == []
    ops = [(v["version"], v["op"], v["edits"]) for v in store.versions()]
    assert ops == [(0, "create", 0), (1, "edit", 1), (2, "edit", 2), (3, "edit", 3), (4, "edit", 4),
                   (5, "rollback", 2), (6, "edit", 3), (7, "rollback", 4), (8, "rollback", 3)]


def test_undo_keeps_changed_columns_only(tmp_path):
    store = column_store(tmp_path / "s", edits=1)
    with store.env.begin() as txn:
        history = dict(txn.cursor(db=store._dbs["history"]))
    (key, undo), = history.items()  # the unchanged background has no undo
    assert key.endswith(b"residual") and len(undo) < 32 * 16 * 4 / 4


def test_undo_of_scattered_changes_keeps_index_value_pairs_and_rolls_back_exactly(tmp_path):
    """A WISE edit changes a random ~20% of a memory's entries: neither rows nor columns are spared."""
    before = torch.randn(64, 48)
    store = Store.create(tmp_path / "s", MANIFEST, {"memory": before})
    after = before.clone()
    scattered = torch.rand(64, 48, generator=torch.Generator().manual_seed(1)) < 0.2
    after[scattered] += 1.0
    store.commit_edit(record(0), None, {"memory": after})
    with store.env.begin() as txn:
        (key, undo), = dict(txn.cursor(db=store._dbs["history"])).items()
    assert key.endswith(b"memory") and len(undo) < 64 * 48 * 4 * 0.5  # (int32, fp32) pairs of the changes
    store.rollback(0)
    assert torch.equal(store.tensors()["memory"], before)
    assert store.verify(width=64) == []


def test_undo_of_a_few_entries_in_a_few_columns_keeps_pairs_and_rolls_back_exactly(tmp_path):
    before = torch.randn(64, 48)
    store = Store.create(tmp_path / "s", MANIFEST, {"memory": before})
    after = before.clone()
    after[[3, 40, 7], [30, 5, 5]] += 1.0  # entries found within the changed columns, mapped back to the matrix
    store.commit_edit(record(0), None, {"memory": after})
    with store.env.begin() as txn:
        (_, undo), = dict(txn.cursor(db=store._dbs["history"])).items()
    assert len(undo) < 64 * 4  # three (int32, fp32) pairs, not two 64-row columns
    store.rollback(0)
    assert torch.equal(store.tensors()["memory"], before) and store.verify(width=64) == []


def test_tensors_are_stored_byte_for_byte_as_safetensors_writes_them():
    """Stored checksums are of these bytes: stores written by safetensors' own serialiser keep verifying
    and rolling back. The commit path's writer reuses one buffer, a large tensor before a small one."""
    from safetensors.torch import save

    from memserve.store.store import _tensor_bytes, _TensorWriter

    writer = _TensorWriter()
    for tensor in (torch.randn(300, 70), torch.randn(3, 5), torch.zeros(()), torch.ones(7, dtype=torch.bool),
                   torch.randn(2, 3).bfloat16(), torch.zeros(0), torch.arange(5), torch.randn(4, 6)[:, ::2]):
        expected = save({"t": tensor.contiguous()})
        assert _tensor_bytes(tensor) == expected and bytes(writer(tensor)) == expected


def test_rollback_refusals(tmp_path):
    store = column_store(tmp_path / "s", edits=2)
    for target, message in ((2, "not an earlier version"), (7, "not an earlier version"), (-1, "not an earlier version")):
        with pytest.raises(StoreError, match=message):
            store.rollback(target)
    store.commit_edits([(record(5), None), (record(6), None)], {"residual": torch.full((32, 16), 9.0)})
    with pytest.raises(StoreError, match="committed in bulk"):
        store.rollback(3)
    store.rollback(2)
    store.rollback(4)  # the last version of a bulk commit has its state
    assert torch.equal(store.tensors()["residual"], torch.full((32, 16), 9.0)) and store.num_edits == 4
    assert store.verify(width=64) == []


def test_compact_keeps_the_last_versions_rollbackable_and_every_record(tmp_path):
    store = column_store(tmp_path / "s", edits=4)
    assert store.rollback(1) == 5  # version 5 has edit 0 only: it points below the cutoff below
    column_edit(store, 1)  # 6
    column_edit(store, 2)  # 7
    states = {v: None for v in range(5, 8)}
    for v in states:  # the tensors of each kept version, read by rolling there and back
        if v < store.version:
            store.rollback(v)
            states[v] = store.tensors()
            store.rollback(7 if v != 7 else 6)
    current = store.tensors()
    with store.env.begin() as txn:
        before = sum(len(v) for _, v in txn.cursor(db=store._dbs["history"]))
    journal_before = store.log()
    version = store.version
    done = store.compact(keep_versions=version - 4)  # keep 5 .. current
    assert done["history_from"] == 5 and done["versions_dropped"] == 5 and 0 < done["bytes_freed"] < before
    assert store.verify(width=64) == [] and store.version == version and torch.equal(store.tensors()["residual"], current["residual"])
    assert [v["version"] for v in store.versions()] == list(range(5, version + 1))
    with pytest.raises(StoreError, match="predates the kept history"):
        store.rollback(4)
    for v, tensors in states.items():
        if tensors is not None:
            store.rollback(v)
            assert torch.equal(store.tensors()["residual"], tensors["residual"]), v
    assert store.verify(width=64) == []
    records_now = {e["record"]["id"] for e in journal_before if e.get("record")}
    with store.env.begin() as txn:  # every edit ever committed is still in the journal
        journaled = {json.loads(value)["record"]["id"] for _, value in txn.cursor(db=store._dbs["journal"])}
    assert records_now <= journaled
    with pytest.raises(StoreError, match="at least 1"):
        store.compact(0)


def test_damaged_history_is_reported_and_not_rolled_back_to(tmp_path):
    store = column_store(tmp_path / "s", edits=3)
    with store.env.begin(write=True) as txn:
        db = store._dbs["history"]
        key, value = next(iter(txn.cursor(db=db)))
        txn.put(key, bytes(value[:-1]) + bytes([value[-1] ^ 0xFF]), db=db)
    assert any("undo of tensor residual: checksum mismatch" in p for p in store.verify())
    before = store.digest()
    with pytest.raises(StoreError, match="does not reproduce version 0"):
        store.rollback(0)
    assert store.digest() == before


def test_store_without_history_starts_it_at_first_write(tmp_path):
    store = column_store(tmp_path / "s", edits=2)
    store.close()
    env = lmdb.open(str(tmp_path / "s"), max_dbs=8)  # make it look like a store written before versions
    with env.begin(write=True) as txn:
        for name in ("versions", "history", "journal"):
            txn.drop(env.open_db(name.encode(), txn=txn), delete=True)
    env.close()
    store = Store.open(tmp_path / "s")
    assert store.versions() == [] and store.info()["history_from"] is None and store.verify(width=64) == []
    column_edit(store, 2)
    assert store.info()["history_from"] == 2 and store.verify(width=64) == []
    with pytest.raises(StoreError, match="predates the kept history"):
        store.rollback(1)
    store.rollback(2)
    assert [r["id"] for r in store.records()] == [0, 1] and store.verify(width=64) == []


def test_export_import_round_trip(tmp_path):
    store = column_store(tmp_path / "s")
    store.rollback(2)
    header = store.export(tmp_path / "s.tar")
    assert header["edits"] == 2 and header["version"] == 5 and header["digest"] == store.digest()
    with Store.import_file(tmp_path / "s.tar", tmp_path / "copy") as copy:
        assert copy.digest() == store.digest() and copy.verify(width=64) == []
        copy.rollback(4)  # the history travels with the export
        assert copy.num_edits == 4
    with pytest.raises(StoreError, match="already exists"):
        Store.import_file(tmp_path / "s.tar", tmp_path / "copy")


def test_bad_export_files_leave_nothing_behind(tmp_path):
    import tarfile

    store = column_store(tmp_path / "s")
    store.export(tmp_path / "s.tar")
    data = bytearray((tmp_path / "s.tar").read_bytes())
    with tarfile.open(tmp_path / "s.tar") as tar:
        member = tar.getmember("data.mdb")
    data[member.offset_data + member.size // 2] ^= 0xFF
    (tmp_path / "damaged.tar").write_bytes(bytes(data))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all")
    for name, message in (("damaged.tar", "damaged export"), ("junk.tar", "not a memserve store export"), ("missing.tar", "cannot import|not a memserve")):
        with pytest.raises(StoreError, match=message):
            Store.import_file(tmp_path / name, tmp_path / "target")
        assert not (tmp_path / "target").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_create_is_all_or_nothing(tmp_path):
    leftover = tmp_path / ".s.staging-dead"  # what a killed create leaves behind
    leftover.mkdir()
    with pytest.raises(Exception):
        Store.create(tmp_path / "s", MANIFEST, {"residual": "not a tensor"})
    assert not (tmp_path / "s").exists() and not leftover.exists()
    Store.create(tmp_path / "s", MANIFEST).close()
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_store_never_pickles(tmp_path, monkeypatch):
    """Every store operation runs with pickle and torch.save/load disabled, and every stored value
    is JSON, safetensors, packed key bits or a decimal number."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used by the store")

    for name in ("dumps", "loads", "dump", "load", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "save", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    store = column_store(tmp_path / "s")
    store.rollback(1)
    store.export(tmp_path / "s.tar")
    store.close()
    store = Store.import_file(tmp_path / "s.tar", tmp_path / "t")
    assert store.verify(width=64) == [] and store.tensors() and store.nearest(store.keys(64)[0], 1)
    monkeypatch.undo()
    from safetensors.torch import load as load_safetensors

    with store.env.begin() as txn:
        for name, db in store._dbs.items():
            for key, value in txn.cursor(db=db):
                value = bytes(value)
                if name in ("tensors", "history"):
                    load_safetensors(value)
                elif name == "columns":  # descriptor JSON, then raw column hashes and column values
                    assert key[:1] != b"d" or json.loads(value)["shape"] == [32, 16]
                elif name == "keys":
                    assert len(value) % 8 == 0
                elif name == "facts" or key in (b"edits", b"version"):
                    assert value.isdigit()
                else:
                    json.loads(value)
    source = (Path(__file__).parents[1] / "store" / "store.py").read_text()
    assert not re.search(r"\bpickle\b|torch\.save|torch\.load|allow_pickle", source)


def test_commit_on_a_stale_memory_state_is_refused(tmp_path):
    store = column_store(tmp_path / "s", edits=2)
    before = store.digest()
    with pytest.raises(StoreError, match="moved to version 2 .* since this session loaded version 1"):
        store.commit_edit(record(5), None, {"residual": torch.zeros(32, 16)}, expected_version=1)
    assert store.digest() == before
    store.commit_edit(record(5), None, {"residual": torch.zeros(32, 16)}, expected_version=2)


def test_by_column_commits_from_several_processes_keep_an_exact_history(tmp_path):
    """A tensor kept by column: a process diffs against the tensor it last wrote only while the store
    still holds it, so commits interleaved from two processes (two caches; LMDB allows one
    environment per process) keep exact undos."""
    store = Store.create(tmp_path / "s", MANIFEST, {"residual": torch.zeros(6, 3, 5)}, by_column=("residual",))
    caches = ({}, {})
    states = [torch.zeros(6, 3, 5)]
    for i, (process, change) in enumerate([(0, (0, 1, 2)), (1, (1, 0, 4)), (0, (5, 2, 0)), (0, (slice(None), 0, 3)), (1, (3, 1, 1))]):
        state = states[-1].clone()
        state[change] = i + 1.0
        store._column_cache = caches[process]
        store.commit_edit(record(i), None, {"residual": state}, expected_version=i)
        states.append(state)
    for version in (0, 3, 1, 5, 2, 4):
        store.rollback(version)
        assert torch.equal(store.tensors()["residual"], states[version]) and store.verify() == []


def test_a_by_column_commit_writes_only_the_columns_it_changed(tmp_path, monkeypatch):
    """An edit that changes one column writes that column's value alone, also when the process's
    cache is gone (another process committed last) and the diff reads the store."""
    import memserve.store.store as store_module

    store = column_store(tmp_path / "s")
    written = []
    column_bytes = store_module._column_bytes
    monkeypatch.setattr(store_module, "_column_bytes",
                        lambda tensor, columns: written.append(columns.tolist()) or column_bytes(tensor, columns))
    column_edit(store, 9)
    store._column_cache = {}
    column_edit(store, 11)
    assert written == [[9], [11]] and store.verify() == []
    assert torch.equal(store.tensors()["residual"][0, [9, 10, 11]], torch.tensor([10.0, 0.0, 12.0]))


def test_a_commit_naming_its_columns_compares_only_those_and_keeps_no_copy(tmp_path, monkeypatch):
    """`columns` (what an edit trained) replaces the whole-tensor diff: named columns that did not
    change are not written, the process keeps no copy of the tensor, and the undo is exact."""
    import memserve.store.store as store_module

    store = column_store(tmp_path / "s", edits=2)
    written = []
    column_bytes = store_module._column_bytes
    monkeypatch.setattr(store_module, "_column_bytes",
                        lambda tensor, columns: written.append(columns.tolist()) or column_bytes(tensor, columns))
    before = store.tensors()["residual"]
    residual = before.clone()
    residual[:, 7] = 5.0
    residual[3, 12] = -1.0
    store.commit_edit(record(7), None, {"residual": residual}, expected_version=2, columns={"residual": torch.tensor([12, 1, 7, 7])})
    assert written == [[7, 12]] and "residual" not in store._column_cache
    assert torch.equal(store.tensors()["residual"], residual) and store.verify() == []
    store.commit_edit(record(8), None, {"residual": residual}, expected_version=3, columns={"residual": torch.tensor([7])})
    store.commit_edit(record(9), None, {"residual": residual}, expected_version=4, columns={"residual": torch.tensor([], dtype=torch.long)})
    assert written == [[7, 12]] and store.version == 5
    store.rollback(2)
    assert torch.equal(store.tensors()["residual"], before) and store.verify() == []
    unchanged = store.digest()
    with pytest.raises(ValueError, match="columns outside 0..15"):
        store.commit_edit(record(10), None, {"residual": residual}, columns={"residual": torch.tensor([16])})
    assert store.digest() == unchanged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_by_column_round_trips_dtypes_and_layout_changes(tmp_path, dtype):
    """A name kept by column holds only 2-D-viewable tensors that way: a 1-D or empty one is kept
    whole, and switching between the two layouts rolls back exactly."""
    states = [torch.zeros(4, 6, dtype=dtype), torch.ones(5, dtype=dtype), torch.zeros(0, 3, dtype=dtype),
              torch.eye(4, 6, dtype=dtype), (torch.arange(24).reshape(2, 3, 4) % 2).to(dtype)]
    store = Store.create(tmp_path / "s", MANIFEST, {"m": states[0]}, by_column=("m",))
    for i, state in enumerate(states[1:]):
        store.commit_edit(record(i), None, {"m": state})
    for version in (3, 0, 2, 1, 4):
        store.rollback(version)
        got = store.tensors()["m"]
        assert got.dtype == dtype and torch.equal(got, states[version]) and store.verify() == []


def test_verify_and_reads_catch_damaged_or_missing_columns(tmp_path):
    store = column_store(tmp_path / "s", edits=2)
    store.close()
    env = lmdb.open(str(tmp_path / "s"), max_dbs=9)
    with env.begin(write=True) as txn:
        columns = env.open_db(b"columns", txn=txn)
        txn.put(b"cresidual\0" + (3).to_bytes(8, "big"), b"\xff" * 32 * 4, db=columns)  # 32 rows, fp32
    env.close()
    store = Store.open(tmp_path / "s")
    assert store.verify() == ["tensor residual: 1 columns damaged (first: 3)"]
    store.close()
    env = lmdb.open(str(tmp_path / "s"), max_dbs=9)
    with env.begin(write=True) as txn:
        txn.delete(b"cresidual\0" + (7).to_bytes(8, "big"), db=env.open_db(b"columns", txn=txn))
    env.close()
    store = Store.open(tmp_path / "s")
    assert any("residual: columns missing (15 of 16 stored)" in p for p in store.verify())
    with pytest.raises(StoreError, match="tensor residual: 16 columns expected, 15 stored"):
        store.tensors()


def test_format_1_stores_open_and_keep_every_tensor_whole(tmp_path):
    store = column_store(tmp_path / "s", edits=2, by_column=())
    store.close()
    env = lmdb.open(str(tmp_path / "s"), max_dbs=9)  # as the previous format wrote it
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        manifest = json.loads(txn.get(b"manifest", db=meta))
        del manifest["column_tensors"]
        txn.put(b"manifest", json.dumps({**manifest, "format_version": 1}).encode(), db=meta)
        txn.drop(env.open_db(b"columns", txn=txn), delete=True)
    env.close()
    store = Store.open(tmp_path / "s")
    column_edit(store, 2)
    store.rollback(1)
    assert torch.equal(store.tensors()["residual"][:, :3], torch.tensor([1.0, 0.0, 0.0]).expand(32, 3))
    assert store.verify(width=64) == [] and store.info()["format_version"] == 1
    store.update_manifest(format_version=3)
    store.close()
    with pytest.raises(StoreError, match="store format 3 is not supported \\(expected 1 or 2\\)"):
        Store.open(tmp_path / "s")


def test_rollback_across_shape_changes_and_new_tensors(tmp_path):
    """WISE-style state: a tensor that grows (full undo) and one that appears later (removed again)."""
    store = Store.create(tmp_path / "s", MANIFEST, {"memories": torch.zeros(1, 4, 4)})
    store.commit_edit(record(0), None, {"memories": torch.ones(2, 4, 4), "eps": torch.tensor([0.5])})
    store.commit_edit(record(1), None, {"memories": torch.full((2, 4, 4), 3.0), "eps": torch.tensor([0.7])})
    store.rollback(0)
    assert store.tensors().keys() == {"memories"} and torch.equal(store.tensors()["memories"], torch.zeros(1, 4, 4))
    store.rollback(1)
    assert torch.equal(store.tensors()["memories"], torch.ones(2, 4, 4)) and torch.equal(store.tensors()["eps"], torch.tensor([0.5]))
    assert store.verify() == []


def test_wise_rollback_across_a_merge_restores_the_memories_exactly(tiny_model_dir, tmp_path):
    """WISE with one shard per edit, merged every two edits: rolling back to before the merge brings
    back the separate shard bit for bit, and rolling forward again brings back the merged memory."""
    import copy

    from memserve.editor import load_memory, open_session
    from memserve.facts import Fact

    from .conftest import FACTS, tiny_config

    facts = [Fact(f["prompt"], f["target"]) for f in FACTS[:3]]
    runner = open_session(tmp_path / "s", tiny_model_dir, method="wise",
                          config=tiny_config("wise", steps=3, save_freq=1, merge_freq=2, negatives=2,
                                             consolidate="ties"))
    try:
        weight = runner.edited.memory.base_weight
        runner.apply(facts[:1])
        first = copy.deepcopy(runner.edited.memory)
        first_version = runner.store.version
        runner.apply(facts[1:2])  # the second edit's shard is TIES-merged with the first
        merged = copy.deepcopy(runner.edited.memory)
        merged_version = runner.store.version
        runner.apply(facts[2:])
        runner.store.rollback(first_version)
        rolled_back = load_memory(runner.store, weight)
        runner.store.rollback(merged_version)
        rolled_forward = load_memory(runner.store, weight)
    finally:
        runner.store.close()
    assert first.memories.shape[0] == 1 and bool(first.memory_is_shard[0])
    assert merged.memories.shape[0] == 1 and not bool(merged.memory_is_shard[0])
    assert not torch.equal(first.memories, merged.memories)
    for restored, want in ((rolled_back, first), (rolled_forward, merged)):
        for name in ("memories", "memory_eps", "memory_is_shard", "side", "side_min_score", "counters"):
            assert torch.equal(getattr(restored, name), getattr(want, name)), name


def test_wise_pool_rollback_restores_each_memory_refit_exactly(tiny_model_dir, tmp_path):
    """The default WISE pool (memories refit from every edit's samples): an edit adds only its own
    samples to the store, and rolling back past edits that joined a memory restores that memory bit
    for bit, rolling forward the refit one."""
    import copy

    from memserve.editor import load_memory, open_session
    from memserve.facts import Fact

    from .conftest import FACTS, tiny_config

    facts = [Fact(f["prompt"], f["target"]) for f in FACTS[:3]]
    runner = open_session(tmp_path / "s", tiny_model_dir, method="wise",
                          config=tiny_config("wise", steps=3, negatives=2, pool=1))
    try:
        weight = runner.edited.memory.base_weight
        runner.apply(facts[:1])
        first, first_version = copy.deepcopy(runner.edited.memory), runner.store.version
        runner.apply(facts[1:])  # both join memory 0, which is refit each time
        last, last_version = copy.deepcopy(runner.edited.memory), runner.store.version
        assert sorted(k for k in runner.store.tensors() if k.startswith("samples-")) == ["samples-0", "samples-1", "samples-2"]
        runner.store.rollback(first_version)
        rolled_back = load_memory(runner.store, weight)
        runner.store.rollback(last_version)
        rolled_forward = load_memory(runner.store, weight)
        assert runner.store.verify() == []
    finally:
        runner.store.close()
    assert first.memories.shape[0] == last.memories.shape[0] == 1
    assert not torch.equal(first.memories, last.memories)
    for restored, want in ((rolled_back, first), (rolled_forward, last)):
        for name in ("memories", "memory_eps", "counters"):
            assert torch.equal(getattr(restored, name), getattr(want, name)), name
        assert all(torch.equal(a, b) for a, b in zip(restored.edit_samples, want.edit_samples))


def test_an_edit_commits_only_the_tensors_it_changed_and_the_store_equals_the_memory(tmp_path, tiny_model_dir):
    """MEMOIR adds one reading per edit: each commit writes Wm and that reading, not the unchanged
    tensors before it, also in a session reopened on the store; Wm's commits name the columns the edit
    trained (no copy of Wm kept for the diff); reloaded, the store is the memory."""
    from memserve.editor import load_memory, open_session
    from memserve.facts import Fact

    from .conftest import FACTS, tiny_config

    facts = [Fact(f["prompt"], f["target"]) for f in FACTS] + [Fact("Who wrote Hamlet?", "Jane Austen")]
    written: list[set[str]] = []
    named: list[list[str]] = []  # tensors whose changed columns the commit named (see Store.commit_edits)

    def spy(runner):
        commit = runner.store.commit_edit

        def recording(record, key, tensors, expected_version=None, columns=None):
            written.append(set(tensors))
            named.append(sorted(columns or {}))
            return commit(record, key, tensors, expected_version, columns)

        runner.store.commit_edit = recording

    runner = open_session(tmp_path / "s", tiny_model_dir, config=tiny_config(steps=3))
    try:
        spy(runner)
        runner.apply(facts[:3])
    finally:
        runner.store.close()
    runner = open_session(tmp_path / "s", tiny_model_dir)
    try:
        spy(runner)
        runner.apply(facts[3:])
        memory = runner.edited.memory
        stored = load_memory(runner.store, runner.edited.proj.weight)
        assert runner.store.verify() == [] and "residual" not in runner.store._column_cache
    finally:
        runner.store.close()
    assert written == [{"residual", f"reading-{i}"} for i in range(4)] and named == [["residual"]] * 4
    assert torch.equal(stored.residual, memory.residual)
    assert len(stored.edit_readings) == 4 and all(torch.equal(a, b) for a, b in zip(stored.edit_readings, memory.edit_readings))
    assert torch.equal(stored.route_keys, memory.route_keys)
