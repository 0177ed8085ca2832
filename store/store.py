"""The persistent edit store: LMDB for everything committed, FAISS for the mask index.

Layout of the LMDB environment (one directory):
- `meta`:    manifest (model, layer, method, config, base-weight hash, format version), current
             version, and the checksum of every memory tensor;
- `records`: one JSON record per edit (fact, time, training loss, content hash), keyed by edit id;
- `keys`:    per-edit routing key bits (MEMOIR masks), packed, keyed by edit id;
- `facts`:   fact identity -> edit id, so a re-run skips what is stored;
- `tensors`: memory tensors as safetensors bytes, by name.

One edit = one LMDB write transaction holding its record, its key and the memory tensors it produced:
a crash leaves the store at the previous edit or the new one, never between. The FAISS index over the
keys is derived data, written after the commit and stamped with the version it reflects; an index with
a stale stamp is rebuilt from LMDB when opened. Nothing here is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import lmdb
import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FORMAT_VERSION = 1
MAP_SIZE = 1 << 38  # address space only; the file grows with the data
INDEX_FILE = "keys.faiss"
DATABASES = ("meta", "records", "keys", "facts", "tensors")


class StoreError(RuntimeError):
    """The store is missing, damaged or cannot be written."""


class StoreMismatchError(StoreError):
    """The store was built for another base model or layer."""


def _edit_key(edit_id: int) -> bytes:
    return struct.pack(">Q", edit_id)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, sort_keys=True).encode()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return save_tensors({"t": tensor.detach().contiguous().cpu()})


def record_checksum(record: dict) -> str:
    return _sha(_dumps({k: v for k, v in record.items() if k != "checksum"}))


class Store:
    """An edit store directory. Use `Store.create` for a new one and `Store.open` for an existing one."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        try:
            self.env = lmdb.open(
                str(self.path), subdir=True, map_size=MAP_SIZE, max_dbs=8, readonly=readonly,
                create=False, lock=not readonly or os.access(path, os.W_OK),
            )
        except lmdb.Error as exc:
            raise StoreError(f"{self.path}: cannot open store: {exc}") from None
        try:
            self._load_manifest()
        except BaseException:
            self.env.close()  # a failed open must not keep the environment (LMDB allows one per process)
            raise

    def _load_manifest(self) -> None:
        try:
            self._dbs = {name: self.env.open_db(name.encode(), create=False) for name in DATABASES}
        except lmdb.Error as exc:
            raise StoreError(f"{self.path}: not a memserve store ({exc})") from None
        manifest = self._get("meta", b"manifest")
        if manifest is None:
            raise StoreError(f"{self.path}: not a memserve store (no manifest)")
        self.manifest: dict = json.loads(manifest)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{self.path}: store format {self.manifest.get('format_version')} is not supported (expected {FORMAT_VERSION})")

    # --- creation and opening -----------------------------------------------------------------
    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return (Path(path) / "data.mdb").exists()

    @classmethod
    def create(cls, path: str | os.PathLike, manifest: dict, tensors: dict[str, torch.Tensor] | None = None) -> "Store":
        path = Path(path)
        if cls.exists(path):
            raise StoreError(f"{path}: a store already exists here")
        path.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(path), subdir=True, map_size=MAP_SIZE, max_dbs=8)
        try:
            with env.begin(write=True) as txn:
                dbs = {name: env.open_db(name.encode(), txn=txn) for name in DATABASES}
                meta = dbs["meta"]
                full = {"format_version": FORMAT_VERSION, "created": time.time(), **manifest}
                txn.put(b"manifest", _dumps(full), db=meta)
                txn.put(b"version", b"0", db=meta)
                txn.put(b"edits", b"0", db=meta)
                sums = {}
                for name, tensor in (tensors or {}).items():
                    data = _tensor_bytes(tensor)
                    txn.put(name.encode(), data, db=dbs["tensors"])
                    sums[name] = _sha(data)
                txn.put(b"tensor_sums", _dumps(sums), db=meta)
        finally:
            env.close()
        return cls(path)

    @classmethod
    def open(cls, path: str | os.PathLike, readonly: bool = False) -> "Store":
        if not cls.exists(path):
            raise StoreError(f"{path}: no store here")
        return cls(path, readonly=readonly)

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_compatible(self, model: str, weight_hash: str, layer: int | None = None) -> None:
        m = self.manifest
        if m["weight_hash"] != weight_hash:
            raise StoreMismatchError(
                f"{self.path}: store was built for model {m['model']} (layer {m['layer']} weights {m['weight_hash'][:12]}), "
                f"not for {model} (weights {weight_hash[:12]}); use another --store"
            )
        if layer is not None and layer != m["layer"]:
            raise StoreMismatchError(f"{self.path}: store edits layer {m['layer']}, not layer {layer}; use another --store")

    # --- reading --------------------------------------------------------------------------------
    def _get(self, db: str, key: bytes) -> bytes | None:
        with self.env.begin() as txn:
            return txn.get(key, db=self._dbs[db])

    @property
    def version(self) -> int:
        return int(self._get("meta", b"version"))

    @property
    def num_edits(self) -> int:
        return int(self._get("meta", b"edits"))

    def find(self, fact_key: str) -> int | None:
        value = self._get("facts", fact_key.encode())
        return None if value is None else int(value)

    def record(self, edit_id: int) -> dict:
        value = self._get("records", _edit_key(edit_id))
        if value is None:
            raise StoreError(f"{self.path}: no edit {edit_id} (the store holds {self.num_edits})")
        return json.loads(value)

    def records(self) -> Iterator[dict]:
        with self.env.begin() as txn:
            for _, value in txn.cursor(db=self._dbs["records"]):
                yield json.loads(value)

    def keys(self, width: int) -> torch.Tensor:
        """Every edit's routing key as a bool matrix [edits with keys, width], in edit order."""
        rows = []
        with self.env.begin() as txn:
            for _, value in txn.cursor(db=self._dbs["keys"]):
                rows.append(np.unpackbits(np.frombuffer(value, dtype=np.uint8))[:width])
        if not rows:
            return torch.zeros(0, width, dtype=torch.bool)
        return torch.from_numpy(np.stack(rows).astype(bool))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        with self.env.begin() as txn:
            for name, value in txn.cursor(db=self._dbs["tensors"]):
                out[name.decode()] = load_tensors(bytes(value))["t"]
        return out

    def info(self) -> dict:
        m = self.manifest
        return {
            "path": str(self.path), "edits": self.num_edits, "version": self.version, "method": m["method"],
            "model": m["model"], "layer": m["layer"], "weight_hash": m["weight_hash"], "config": m["config"],
            "format_version": m["format_version"], "created": m["created"],
        }

    # --- writing --------------------------------------------------------------------------------
    def update_manifest(self, **fields: Any) -> None:
        with self.env.begin(write=True) as txn:
            manifest = {**json.loads(txn.get(b"manifest", db=self._dbs["meta"])), **fields}
            txn.put(b"manifest", _dumps(manifest), db=self._dbs["meta"])
        self.manifest = manifest

    def commit_edit(self, record: dict, key: torch.Tensor | None, tensors: dict[str, torch.Tensor]) -> int:
        """Store one edit together with the memory state it produced, atomically. Returns its id."""
        return self.commit_edits([(record, key)], tensors)[0]

    def commit_edits(self, edits: list[tuple[dict, torch.Tensor | None]], tensors: dict[str, torch.Tensor]) -> list[int]:
        """Store several edits (record, key) and the memory state after the last one in ONE transaction:
        bulk imports write the dense tensors once instead of once per edit. Each edit still gets its own
        version. Returns their ids."""
        ids = []
        try:
            with self.env.begin(write=True) as txn:
                meta = self._dbs["meta"]
                edit_id = int(txn.get(b"edits", db=meta))
                version = int(txn.get(b"version", db=meta))
                for record, key in edits:
                    version += 1
                    record = {**record, "id": edit_id, "version": version, "time": time.time()}
                    record["checksum"] = record_checksum(record)
                    txn.put(_edit_key(edit_id), _dumps(record), db=self._dbs["records"])
                    if key is not None:
                        bits = np.packbits(key.detach().cpu().numpy().astype(np.uint8)).tobytes()
                        txn.put(_edit_key(edit_id), bits, db=self._dbs["keys"])
                    if "fact_key" in record:
                        txn.put(record["fact_key"].encode(), str(edit_id).encode(), db=self._dbs["facts"])
                    ids.append(edit_id)
                    edit_id += 1
                sums = json.loads(txn.get(b"tensor_sums", db=meta))
                for name, tensor in tensors.items():
                    data = _tensor_bytes(tensor)
                    txn.put(name.encode(), data, db=self._dbs["tensors"])
                    sums[name] = _sha(data)
                txn.put(b"tensor_sums", _dumps(sums), db=meta)
                txn.put(b"edits", str(edit_id).encode(), db=meta)
                txn.put(b"version", str(version).encode(), db=meta)
        except lmdb.Error as exc:
            raise StoreError(f"{self.path}: edit not stored: {exc}") from None
        return ids

    # --- FAISS index over the routing keys ------------------------------------------------------
    def key_index(self, width: int):
        """A FAISS binary index over every stored key (ids = edit ids), rebuilt when stale."""
        import faiss

        index_path = self.path / INDEX_FILE
        stamp_path = self.path / (INDEX_FILE + ".version")
        version = str(self.version)
        if index_path.exists() and stamp_path.exists() and stamp_path.read_text() == version:
            return faiss.read_index_binary(str(index_path))
        ids, rows = [], []
        with self.env.begin() as txn:
            for key, value in txn.cursor(db=self._dbs["keys"]):
                ids.append(struct.unpack(">Q", key)[0])
                rows.append(np.frombuffer(value, dtype=np.uint8))
        bits = ((width + 7) // 8) * 8
        index = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(bits))
        if rows:
            index.add_with_ids(np.stack(rows), np.asarray(ids, dtype=np.int64))
        if not self.readonly:
            for target, write in ((index_path, lambda p: faiss.write_index_binary(index, p)), (stamp_path, lambda p: Path(p).write_text(version))):
                fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-")
                os.close(fd)
                write(tmp)
                os.replace(tmp, target)
        return index

    def nearest(self, key: torch.Tensor, count: int = 5) -> list[tuple[int, int]]:
        """The stored edits whose keys are closest to `key`: (edit id, shared active bits)."""
        width = key.shape[-1]
        index = self.key_index(width)
        if index.ntotal == 0:
            return []
        query = np.packbits(key.cpu().numpy().astype(np.uint8))[None]
        distances, ids = index.search(query, min(count, index.ntotal))
        ones = int(key.sum())
        # With exactly `ones` bits set on both sides, shared bits = ones - hamming / 2.
        return [(int(i), ones - int(d) // 2) for d, i in zip(distances[0], ids[0]) if i >= 0]

    # --- integrity ------------------------------------------------------------------------------
    def verify(self, width: int | None = None) -> list[str]:
        """Every problem found (empty when the store checks out)."""
        problems = []
        with self.env.begin() as txn:
            edits = int(txn.get(b"edits", db=self._dbs["meta"]))
            sums = json.loads(txn.get(b"tensor_sums", db=self._dbs["meta"]))
            seen = 0
            for key, value in txn.cursor(db=self._dbs["records"]):
                edit_id = struct.unpack(">Q", key)[0]
                record = json.loads(value)
                seen += 1
                if record.get("id") != edit_id:
                    problems.append(f"record {edit_id}: id field says {record.get('id')}")
                if record.get("checksum") != record_checksum(record):
                    problems.append(f"record {edit_id}: checksum mismatch")
                if record.get("content_hash") != _sha(_dumps(record.get("fact"))):
                    problems.append(f"record {edit_id}: fact content hash mismatch")
            if seen != edits:
                problems.append(f"manifest counts {edits} edits but {seen} records are stored")
            for name, expected in sums.items():
                data = txn.get(name.encode(), db=self._dbs["tensors"])
                if data is None:
                    problems.append(f"tensor {name}: missing")
                elif _sha(bytes(data)) != expected:
                    problems.append(f"tensor {name}: checksum mismatch")
            key_ids = [struct.unpack(">Q", k)[0] for k, _ in txn.cursor(db=self._dbs["keys"])]
        if any(i >= edits for i in key_ids):
            problems.append("keys stored for edits that have no record")
        if width is not None and key_ids:
            index = self.key_index(width)
            if index.ntotal != len(key_ids):
                problems.append(f"FAISS index holds {index.ntotal} keys, LMDB {len(key_ids)}")
        return problems


def content_hash(fact: dict) -> str:
    return _sha(_dumps(fact))
