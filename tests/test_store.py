"""LMDB + FAISS store: atomic commits, refusal of foreign models, verification."""

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
