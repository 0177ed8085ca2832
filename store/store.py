"""The persistent edit store: LMDB for everything committed, FAISS for the mask index.

Layout of the LMDB environment (one directory):
- `meta`:    manifest (model, layer, method, config, base-weight hash, format version), current
             version, and the checksum of every memory tensor;
- `records`: one JSON record per edit (fact, time, training loss, content hash), keyed by edit id;
- `keys`:    per-edit routing key bits (MEMOIR masks), packed, keyed by edit id;
- `facts`:   fact identity -> edit id, so a re-run skips what is stored;
- `tensors`: memory tensors as safetensors bytes, by name;
- `columns`: the tensors the manifest's `column_tensors` names (MEMOIR's residual), one value per
             column of their 2-D view plus a descriptor and a hash per column (see `_put_by_column`):
             a MEMOIR edit changes only its mask's columns, and a commit writes only those (format 2);
- `versions`: one JSON entry per version (what made it: create, edit, rollback; its edit count and the
             checksum of every memory tensor it had);
- `history`: per version and tensor, the *undo* from that version back to the one before, as
             safetensors: the changed columns (or rows, or scattered entries as index/value pairs) of the
             previous tensor, all of it when its shape changed, or an `absent` marker. A MEMOIR edit
             changes only its mask's columns, so its undo is ~top_k/I of the residual; a WISE edit
             changes its gradient mask's entries (~mask_ratio of one memory), kept as pairs;
- `journal`: every edit ever committed (record + key bits), keyed by the version that committed it.

One edit = one LMDB write transaction holding its record, its key, its journal entry, the memory
tensors it produced and their undo: a crash leaves the store at the previous edit or the new one, never
between. Rollback to version V replays the undos from the current version down to V, checks the result
against V's recorded tensor checksums and commits it as a *new* version whose active edits are V's
(rebuilt from the journal), so nothing committed is lost: rolling back to a later version brings the
rolled-back edits back. Stores written before versions were kept get their history started at their
current version on the first write. The FAISS index over the keys is derived data, written after the
commit and stamped with the version it reflects; an index with a stale stamp is rebuilt from LMDB when
opened. Values are JSON, safetensors or packed bits only: nothing here is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import struct
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import lmdb
import numpy as np
import torch
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

FORMAT_VERSION = 2  # 2: tensors may be kept by column (`columns`); 1 is still read and written
SUPPORTED_FORMATS = (1, 2)
MAP_SIZE = 1 << 38  # address space only; the file grows with the data
INDEX_FILE = "keys.faiss"
DATABASES = ("meta", "records", "keys", "facts", "tensors")
HISTORY_DATABASES = ("versions", "history", "journal")
COLUMN_DATABASE = "columns"  # absent in format 1
MAX_DBS = 9
EXPORT_FORMAT = "memserve-store-export"
EXPORT_HEADER = "memserve-store.json"
EXPORT_DATA = "data.mdb"


class StoreError(RuntimeError):
    """The store is missing, damaged or cannot be written."""


class StoreMismatchError(StoreError):
    """The store was built for another base model or layer."""


def _id_key(number: int) -> bytes:
    """Edit ids and versions as big-endian keys, so cursors walk them in order."""
    return struct.pack(">Q", number)


def _prompt_key(prompt_key: str) -> bytes:
    return b"prompt:" + prompt_key.encode()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, sort_keys=True).encode()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """safetensors bytes of `{"t": tensor}`, exactly as safetensors itself writes them."""
    return bytes(_TensorWriter()(tensor))


class _TensorWriter:
    """`_tensor_bytes`, byte for byte (stored checksums are of those bytes), into one buffer it keeps
    and hands out until the next call: a commit of a large tensor kept whole (a format-1 store's 56 MB
    residual) then copies it once instead of allocating fresh memory the kernel faults in page by page."""

    def __init__(self):
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def __call__(self, tensor: torch.Tensor) -> memoryview:
        tensor = tensor.detach().contiguous().cpu()
        size = tensor.numel() * tensor.element_size()
        meta = {"t": {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [0, size]}}
        header = json.dumps(meta, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        start = 8 + len(header)
        if self._buffer.numel() < start + size:
            self._buffer = torch.empty(start + size, dtype=torch.uint8)
        out = self._buffer[:start + size]
        out[:start] = torch.frombuffer(bytearray(struct.pack("<Q", len(header)) + header), dtype=torch.uint8)
        if size:
            out[start:] = tensor.reshape(-1).view(torch.uint8)
        return memoryview(out.numpy())


def _load_tensor(data) -> torch.Tensor:
    return load_tensors(bytes(data))["t"]


def _tensor_view(data: memoryview) -> torch.Tensor:
    """The tensor in `_tensor_bytes` output, read in place (no copy): read-only, valid while `data` is."""
    size = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(bytes(data[8:8 + size]))["t"]
    start, end = meta["data_offsets"]
    dtype = SAFETENSORS_DTYPES[meta["dtype"]]
    if end == start:
        return torch.empty(meta["shape"], dtype=dtype)
    with warnings.catch_warnings():  # torch warns that the buffer is read-only: it is only read here
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + size + start)
    return flat.reshape(meta["shape"])


@contextlib.contextmanager
def _stored_view(env, txn, db, key: bytes) -> Iterator[torch.Tensor | None]:
    """The tensor stored under `key` as `txn` sees it, read in place from the memory map for as long
    as the block runs (a child transaction hands out buffers): a commit computes its undo against a
    large stored tensor without copying and parsing it first."""
    child = env.begin(write=True, parent=txn, buffers=True)
    try:
        data = child.get(key, db=db)
        yield None if data is None else _tensor_view(data)
    finally:
        child.abort()


def record_checksum(record: dict) -> str:
    return _sha(_dumps({k: v for k, v in record.items() if k != "checksum"}))


def _undo(old: torch.Tensor | None, new: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """What turns `new` back into `old` (see the module doc); `new` None means the tensor goes away."""
    if old is None:
        return {"absent": torch.zeros(0)}
    if new is None or old.shape != new.shape or old.dtype != new.dtype or old.dim() == 0:
        return {"full": old}
    o, n = old.reshape(old.shape[0], -1), new.reshape(new.shape[0], -1)
    cols = (o != n).any(0).nonzero().squeeze(1)
    changed = o[:, cols] != n[:, cols]  # every change is in these columns (a MEMOIR edit: its mask's)
    rows = changed.any(1).nonzero().squeeze(1)
    dense = min(cols.numel() * o.shape[0], rows.numel() * o.shape[1])  # entries a row/column undo keeps
    entries = changed.nonzero()
    if entries.shape[0] * 2 < dense and o.numel() < 2**31:  # scattered changes: (int32 index, value) pairs
        flat = (entries[:, 0] * o.shape[1] + cols[entries[:, 1]]).to(torch.int32)
        return {"entries": flat, "values": o.reshape(-1)[flat.long()].contiguous()}
    if cols.numel() * o.shape[0] <= rows.numel() * o.shape[1]:
        return {"cols": cols, "values": o[:, cols].contiguous()}
    return {"rows": rows, "values": o[rows].contiguous()}


def _apply_undo(new: torch.Tensor | None, undo: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if "absent" in undo:
        return None
    if "full" in undo:
        return undo["full"]
    out = new.clone().reshape(new.shape[0], -1)
    if "entries" in undo:
        out.view(-1)[undo["entries"].long()] = undo["values"]
    elif "cols" in undo:
        out[:, undo["cols"]] = undo["values"]
    else:
        out[undo["rows"]] = undo["values"]
    return out.reshape(new.shape)


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A hidden sibling directory that becomes `path` only if the block succeeds, so a crash or an
    error never leaves a half-made store at `path` (leftovers of a killed run are removed here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = path.parent / f".{path.name}.staging-{os.getpid()}-{os.urandom(4).hex()}"
    staging.mkdir()  # not mkdtemp: the store keeps the usual (umask) permissions
    try:
        yield staging
        try:
            os.rename(staging, path)  # replaces `path` only if it is an empty directory
        except OSError as exc:
            raise StoreError(f"{path}: cannot create store: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class Store:
    """An edit store directory. Use `Store.create` for a new one and `Store.open` for an existing one."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._writer = _TensorWriter()
        self._column_cache: dict[str, tuple[str, torch.Tensor]] = {}  # see `_put_by_column`
        try:
            self.env = lmdb.open(
                str(self.path), subdir=True, map_size=MAP_SIZE, max_dbs=MAX_DBS, readonly=readonly,
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
        for name in (*HISTORY_DATABASES, COLUMN_DATABASE):  # absent in older stores
            with contextlib.suppress(lmdb.NotFoundError):
                self._dbs[name] = self.env.open_db(name.encode(), create=False)
        manifest = self._get("meta", b"manifest")
        if manifest is None:
            raise StoreError(f"{self.path}: not a memserve store (no manifest)")
        self.manifest: dict = json.loads(manifest)
        if self.manifest.get("format_version") not in SUPPORTED_FORMATS:
            supported = " or ".join(map(str, SUPPORTED_FORMATS))
            raise StoreError(f"{self.path}: store format {self.manifest.get('format_version')} is not supported (expected {supported})")

    # --- creation and opening -----------------------------------------------------------------
    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return (Path(path) / "data.mdb").exists()

    @classmethod
    def create(cls, path: str | os.PathLike, manifest: dict, tensors: dict[str, torch.Tensor] | None = None,
               by_column: tuple[str, ...] = ()) -> "Store":
        """A new store holding `tensors`. Those named in `by_column` are kept one LMDB value per column
        of their 2-D view ([shape[0], rest]): a commit then writes only the columns that changed (a
        MEMOIR edit changes its mask's columns of a residual that is 56 MB for the default model)."""
        path = Path(path)
        if cls.exists(path):
            raise StoreError(f"{path}: a store already exists here")
        with _staged(path) as staging:
            env = lmdb.open(str(staging), subdir=True, map_size=MAP_SIZE, max_dbs=MAX_DBS)
            try:
                with env.begin(write=True) as txn:
                    dbs = {name: env.open_db(name.encode(), txn=txn) for name in (*DATABASES, *HISTORY_DATABASES, COLUMN_DATABASE)}
                    meta = dbs["meta"]
                    full = {"format_version": FORMAT_VERSION, "created": time.time(), **manifest, "column_tensors": sorted(by_column)}
                    txn.put(b"manifest", _dumps(full), db=meta)
                    txn.put(b"tensor_sums", _dumps({}), db=meta)
                    _put_state(env, txn, dbs, 0, None, tensors or {}, {"op": "create", "edits": 0}, _TensorWriter(), {})
            finally:
                env.close()
        return cls(path)

    @classmethod
    def import_file(cls, file: str | os.PathLike, path: str | os.PathLike) -> "Store":
        """A new store at `path` from an `export` file, checked (header digest, `verify`) before it
        appears at `path`."""
        file, path = Path(file), Path(path)
        if cls.exists(path):
            raise StoreError(f"{path}: a store already exists here")
        try:
            with tarfile.open(file, "r:") as tar, _staged(path) as staging:
                header = json.load(tar.extractfile(EXPORT_HEADER))
                if header.get("format") != EXPORT_FORMAT:
                    raise StoreError(f"{file}: not a memserve store export")
                member = tar.getmember(EXPORT_DATA)
                if not member.isfile():
                    raise StoreError(f"{file}: {EXPORT_DATA} is not a regular file")
                file_sha = hashlib.sha256()
                with tar.extractfile(member) as source, open(staging / EXPORT_DATA, "wb") as target:
                    for chunk in iter(lambda: source.read(1 << 20), b""):
                        file_sha.update(chunk)
                        target.write(chunk)
                if file_sha.hexdigest() != header["sha256"]:
                    raise StoreError(f"{file}: damaged export: {EXPORT_DATA} does not match its checksum")
                with cls(staging) as store:
                    problems = store.verify()
                    if store.digest() != header["digest"]:
                        problems.append("content differs from the digest in the export header")
                if problems:
                    raise StoreError(f"{file}: damaged export: {problems[0]}")
        except (tarfile.TarError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{file}: not a memserve store export ({exc})") from None
        except OSError as exc:
            raise StoreError(f"{file}: cannot import: {exc.strerror or exc}") from None
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
        value = self._get("records", _id_key(edit_id))
        if value is None:
            raise StoreError(f"{self.path}: no edit {edit_id} (the store holds {self.num_edits})")
        return json.loads(value)

    def records(self) -> Iterator[dict]:
        with self.env.begin() as txn:
            for _, value in txn.cursor(db=self._dbs["records"]):
                yield json.loads(value)

    def keys(self, width: int) -> torch.Tensor:
        """Every edit's first routing key as a bool matrix [edits with keys, width], in edit order."""
        keys, owners = self.routing_keys(width)
        first = torch.ones_like(owners, dtype=torch.bool)
        first[1:] = owners[1:] != owners[:-1]
        return keys[first]

    def routing_keys(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All routing keys [K, width] (an edit may have several, e.g. plain and chat-formatted) and
        the position of the owning edit among the edits with keys [K], in edit order."""
        rows, owners = [], []
        with self.env.begin() as txn:
            for position, (_, value) in enumerate(txn.cursor(db=self._dbs["keys"])):
                edit_keys = unpack_keys(value, width)
                rows.append(edit_keys)
                owners += [position] * len(edit_keys)
        if not rows:
            return torch.zeros(0, width, dtype=torch.bool), torch.zeros(0, dtype=torch.long)
        return torch.from_numpy(np.concatenate(rows)), torch.tensor(owners, dtype=torch.long)

    def tensors(self) -> dict[str, torch.Tensor]:
        with self.env.begin() as txn:
            return _current_tensors(txn, self._dbs)

    def versions(self) -> list[dict]:
        """The kept versions, oldest first (empty for a store written before versions were kept)."""
        if "versions" not in self._dbs:
            return []
        with self.env.begin() as txn:
            return [json.loads(value) for _, value in txn.cursor(db=self._dbs["versions"])]

    def info(self) -> dict:
        m = self.manifest
        versions = self.versions()
        return {
            "path": str(self.path), "edits": self.num_edits, "version": self.version, "method": m["method"],
            "model": m["model"], "layer": m["layer"], "weight_hash": m["weight_hash"], "config": m["config"],
            "format_version": m["format_version"], "created": m["created"],
            "history_from": versions[0]["version"] if versions else None,
        }

    def identity(self) -> str:
        """Changes with every commit and tells stores apart even at the same version number (another
        store, a copy edited differently): the manifest (creation time included), the version, the
        edit count and the checksums of the memory tensors. Cheap: four reads."""
        digest = hashlib.sha256()
        with self.env.begin() as txn:
            for key in (b"manifest", b"version", b"edits", b"tensor_sums"):
                part = txn.get(key, db=self._dbs["meta"]) or b""
                digest.update(struct.pack(">Q", len(part)) + part)
        return digest.hexdigest()[:32]

    def digest(self) -> str:
        """SHA-256 over every committed key and value (the FAISS index is derived and left out):
        equal digests mean equal stores, so it shows that a failed command changed nothing."""
        digest = hashlib.sha256()
        with self.env.begin() as txn:
            for name in sorted(self._dbs):
                for key, value in txn.cursor(db=self._dbs[name]):
                    for part in (name.encode(), key, value):
                        digest.update(struct.pack(">Q", len(part)) + part)
        return digest.hexdigest()

    # --- writing --------------------------------------------------------------------------------
    def update_manifest(self, **fields: Any) -> None:
        with self.env.begin(write=True) as txn:
            manifest = {**json.loads(txn.get(b"manifest", db=self._dbs["meta"])), **fields}
            txn.put(b"manifest", _dumps(manifest), db=self._dbs["meta"])
        self.manifest = manifest

    def _write_dbs(self, txn) -> dict:
        """The databases for a write transaction; a store written before versions were kept gets its
        history started at its current version (its older versions cannot be rolled back to)."""
        if "versions" in self._dbs:
            return self._dbs
        dbs = {**self._dbs, **{name: self.env.open_db(name.encode(), txn=txn) for name in HISTORY_DATABASES}}
        meta = dbs["meta"]
        version = int(txn.get(b"version", db=meta))
        if txn.get(_id_key(version), db=dbs["versions"]) is None:  # another process may have done it
            active = []
            for key, value in txn.cursor(db=dbs["records"]):
                record = json.loads(value)
                bits = txn.get(key, db=dbs["keys"])
                txn.put(_id_key(record["version"]), _journal_entry(record, bits), db=dbs["journal"])
                active.append(record["version"])
            _put_version(txn, dbs, {
                "version": version, "op": "baseline", "edits": int(txn.get(b"edits", db=meta)), "restores": None,
                "tensor_sums": json.loads(txn.get(b"tensor_sums", db=meta)), "undo_sums": {}, "active": active,
            })
        return dbs

    def commit_edit(self, record: dict, key: torch.Tensor | None, tensors: dict[str, torch.Tensor], expected_version: int | None = None,
                    columns: dict[str, torch.Tensor] | None = None) -> int:
        """Store one edit together with the memory state it produced, atomically. Returns its id."""
        return self.commit_edits([(record, key)], tensors, expected_version, columns)[0]

    def commit_edits(self, edits: list[tuple[dict, torch.Tensor | None]], tensors: dict[str, torch.Tensor], expected_version: int | None = None,
                     columns: dict[str, torch.Tensor] | None = None) -> list[int]:
        """Store several edits (record, key) and the memory state after the last one in ONE transaction:
        bulk imports write the dense tensors once instead of once per edit. Each edit still gets its own
        version, but only the last one's memory state is kept (the others cannot be rolled back to).
        A record with the `prompt_key` of an earlier edit gets `supersedes` (that edit's id).
        `expected_version` is the version the caller's memory state was built on: the commit is refused
        if another process has edited or rolled back since, as its tensors would undo that work.
        `columns` may name, per tensor kept by column, the only columns that differ from that version
        (e.g. those an edit trained): the store then compares just those and keeps no copy of the tensor.
        Returns their ids."""
        ids = []
        try:
            with self.env.begin(write=True) as txn:
                dbs = self._write_dbs(txn)
                meta = dbs["meta"]
                edit_id = int(txn.get(b"edits", db=meta))
                start = int(txn.get(b"version", db=meta))
                if expected_version is not None and start != expected_version:
                    raise StoreError(
                        f"{self.path}: the store moved to version {start} (another edit or rollback) since this "
                        f"session loaded version {expected_version}; nothing was written, run the command again"
                    )
                for version, (record, key) in enumerate(edits, start=start + 1):
                    record = {**record, "id": edit_id, "version": version, "time": time.time()}
                    if "prompt_key" in record:
                        earlier = txn.get(_prompt_key(record["prompt_key"]), db=dbs["facts"])
                        if earlier is not None:
                            record["supersedes"] = int(earlier)
                    record["checksum"] = record_checksum(record)
                    bits = None if key is None else pack_keys(key)
                    _put_edit(txn, dbs, record, bits)
                    txn.put(_id_key(version), _journal_entry(record, bits), db=dbs["journal"])
                    ids.append(edit_id)
                    edit_id += 1
                    if version < start + len(edits):
                        _put_version(txn, dbs, {"version": version, "op": "edit", "edits": edit_id, "restores": None, "tensor_sums": None, "undo_sums": {}})
                _put_state(self.env, txn, dbs, start + len(edits), start, tensors, {"op": "edit", "edits": edit_id}, self._writer,
                           self._column_cache, columns)
        except lmdb.Error as exc:
            raise StoreError(f"{self.path}: edit not stored: {exc}") from None
        self._dbs = dbs
        return ids

    def log(self) -> list[dict]:
        """Every kept version, oldest first, with the record of the edit that made it (when one did):
        what changed, when, and who asked (the `by` a command recorded)."""
        entries = self.versions()
        with self.env.begin() as txn:
            for entry in entries:
                journal = txn.get(_id_key(entry["version"]), db=self._dbs["journal"])
                if journal is not None:
                    entry["record"] = json.loads(journal)["record"]
        return entries

    def rollback(self, target: int, by: dict | None = None) -> int:
        """Make version `target`'s edits and memory tensors current again, as a new version (returned).
        Nothing is deleted: the rolled-back edits stay in the journal and their versions in the
        history, so rolling back to a later version brings them back. `by`: who asked (kept in the log)."""
        try:
            with self.env.begin(write=True) as txn:
                dbs = self._write_dbs(txn)
                current = int(txn.get(b"version", db=dbs["meta"]))
                if not 0 <= target < current:
                    raise StoreError(f"{self.path}: version {target} is not an earlier version (current: {current})")
                entry = _version_entry(txn, dbs, target)
                if entry is None:
                    first = next(iter(txn.cursor(db=dbs["versions"])))[0]
                    raise StoreError(f"{self.path}: version {target} predates the kept history (from version {struct.unpack('>Q', first)[0]})")
                if entry["tensor_sums"] is None:
                    raise StoreError(f"{self.path}: version {target} was committed in bulk; its memory state was not kept")
                old = _current_tensors(txn, dbs)
                state = _replay(txn, dbs, dict(old), current, target)
                by_column = self.manifest.get("column_tensors", [])
                if {name: _checksum(t, name in by_column) for name, t in state.items()} != entry["tensor_sums"]:
                    raise StoreError(f"{self.path}: the history does not reproduce version {target}'s tensors; run `store verify`")
                active = _active_versions(txn, dbs, target)
                for name in ("records", "keys", "facts"):
                    txn.drop(dbs[name], delete=False)
                for commit_version in active:
                    journal = json.loads(txn.get(_id_key(commit_version), db=dbs["journal"]))
                    _put_edit(txn, dbs, journal["record"], None if journal["key"] is None else bytes.fromhex(journal["key"]))
                tensors = {name: state.get(name) for name in set(state) | set(old)}
                entry = {"op": "rollback", "to": target, "edits": len(active), **({"by": by} if by else {})}
                _put_state(self.env, txn, dbs, current + 1, current, tensors, entry, self._writer, self._column_cache)
        except lmdb.Error as exc:
            raise StoreError(f"{self.path}: rollback not done: {exc}") from None
        self._dbs = dbs
        return current + 1

    def compact(self, keep_versions: int) -> dict:
        """Forget the memory history older than the last `keep_versions` versions (the current one
        counts): their undos are deleted, so rollback reaches back only that far. Records, keys and the
        journal of every edit ever committed stay. The freed pages are reused by later commits (LMDB
        does not shrink its file; `export` + `import` writes a compacted copy). Returns what was done."""
        if keep_versions < 1:
            raise StoreError(f"{self.path}: --keep-versions must be at least 1 (the current version)")
        try:
            with self.env.begin(write=True) as txn:
                dbs = self._write_dbs(txn)
                current = int(txn.get(b"version", db=dbs["meta"]))
                first = struct.unpack(">Q", next(iter(txn.cursor(db=dbs["versions"])))[0])[0]
                cutoff = max(first, current - keep_versions + 1)  # the oldest version kept
                kept = {v: _version_entry(txn, dbs, v) for v in range(cutoff, current + 1)}
                # Versions that lead below the cutoff (the cutoff itself, rollbacks to older versions)
                # keep their active edits in their entry, since what they point to goes.
                anchored = {v: _active_versions(txn, dbs, v) for v, e in kept.items()
                            if v == cutoff or (e["op"] == "rollback" and e["to"] < cutoff)}
                freed, dropped = 0, 0
                for version in range(first, cutoff + 1):
                    for name, undo in list(_undos(txn, dbs, version)):
                        txn.delete(_id_key(version) + name.encode(), db=dbs["history"])
                        freed += len(undo)
                    if version < cutoff:
                        txn.delete(_id_key(version), db=dbs["versions"])
                        dropped += 1
                for version, active in anchored.items():
                    entry = {**kept[version], "active": active}
                    if version == cutoff:
                        entry["undo_sums"] = {}
                    txn.put(_id_key(version), _dumps(entry), db=dbs["versions"])
        except lmdb.Error as exc:
            raise StoreError(f"{self.path}: compaction not done: {exc}") from None
        self._dbs = dbs
        return {"history_from": cutoff, "versions_dropped": dropped, "bytes_freed": freed}

    def export(self, file: str | os.PathLike) -> dict:
        """Write the store as one portable file: an uncompressed tar of a JSON header (`info`, the
        content digest, the data file's SHA-256) and a compacted copy of the LMDB file (the FAISS
        index is derived, left out). The file appears complete or not at all. Returns the header."""
        file = Path(file)
        try:
            with tempfile.TemporaryDirectory(dir=file.parent, prefix=f".{file.name}.") as tmp:
                copy = Path(tmp) / "store"
                copy.mkdir()
                self.env.copy(str(copy), compact=True)
                with Store(copy, readonly=True) as snapshot:
                    header = {"format": EXPORT_FORMAT, **snapshot.info(), "digest": snapshot.digest()}
                del header["path"]
                header["sha256"] = _sha((copy / EXPORT_DATA).read_bytes())
                partial = Path(tmp) / "export.tar"
                with tarfile.open(partial, "w:", format=tarfile.PAX_FORMAT) as tar:
                    data = _dumps(header)
                    member = tarfile.TarInfo(EXPORT_HEADER)
                    member.size, member.mtime = len(data), int(time.time())
                    tar.addfile(member, io.BytesIO(data))
                    tar.add(copy / EXPORT_DATA, arcname=EXPORT_DATA)
                os.replace(partial, file)
        except (OSError, lmdb.Error) as exc:
            raise StoreError(f"{file}: export failed: {getattr(exc, 'strerror', None) or exc}") from None
        return header

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
                packed = np.frombuffer(value, dtype=np.uint8).reshape(-1, (width + 7) // 8)
                ids += [struct.unpack(">Q", key)[0]] * len(packed)
                rows += list(packed)
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
            records = []
            for key, value in txn.cursor(db=self._dbs["records"]):
                edit_id = struct.unpack(">Q", key)[0]
                record = json.loads(value)
                records.append(record)
                if record.get("id") != edit_id:
                    problems.append(f"record {edit_id}: id field says {record.get('id')}")
                if record.get("checksum") != record_checksum(record):
                    problems.append(f"record {edit_id}: checksum mismatch")
                if record.get("content_hash") != _sha(_dumps(record.get("fact"))):
                    problems.append(f"record {edit_id}: fact content hash mismatch")
                if "fact_key" in record and txn.get(record["fact_key"].encode(), db=self._dbs["facts"]) != str(edit_id).encode():
                    problems.append(f"record {edit_id}: fact index does not point to it")
            if len(records) != edits:
                problems.append(f"manifest counts {edits} edits but {len(records)} records are stored")
            for name, expected in sums.items():
                data = txn.get(name.encode(), db=self._dbs["tensors"])
                if data is None and _stored_descriptor(txn, self._dbs, name) is not None:
                    problems += _verify_columns(txn, self._dbs, name, expected)
                elif data is None:
                    problems.append(f"tensor {name}: missing")
                elif _sha(bytes(data)) != expected:
                    problems.append(f"tensor {name}: checksum mismatch")
            key_ids = [struct.unpack(">Q", k)[0] for k, _ in txn.cursor(db=self._dbs["keys"])]
            key_rows = [] if width is None else [
                struct.unpack(">Q", k)[0] for k, v in txn.cursor(db=self._dbs["keys"]) for _ in range(len(v) // ((width + 7) // 8))]
            if "versions" in self._dbs:
                problems += _verify_history(txn, self._dbs, records, sums)
        if any(i >= edits for i in key_ids):
            problems.append("keys stored for edits that have no record")
        if width is not None and key_ids:
            import faiss

            index = self.key_index(width)
            if sorted(faiss.vector_to_array(index.id_map).tolist()) != key_rows:
                problems.append(f"FAISS index holds other ids than LMDB's {len(key_rows)} keys")
        return problems


# --- transaction helpers (shared by create, commit, rollback) --------------------------------------
def _journal_entry(record: dict, bits: bytes | None) -> bytes:
    return _dumps({"record": record, "key": None if bits is None else bytes(bits).hex()})


def _put_edit(txn, dbs: dict, record: dict, bits: bytes | None) -> None:
    """An edit into the current view: its record, its key, and the fact and prompt indexes."""
    edit_id = _id_key(record["id"])
    txn.put(edit_id, _dumps(record), db=dbs["records"])
    if bits is not None:
        txn.put(edit_id, bits, db=dbs["keys"])
    if "fact_key" in record:
        txn.put(record["fact_key"].encode(), str(record["id"]).encode(), db=dbs["facts"])
    if "prompt_key" in record:
        txn.put(_prompt_key(record["prompt_key"]), str(record["id"]).encode(), db=dbs["facts"])


def _put_version(txn, dbs: dict, entry: dict) -> None:
    txn.put(_id_key(entry["version"]), _dumps({"time": time.time(), **entry}), db=dbs["versions"])


def _put_state(env, txn, dbs: dict, version: int, restores: int | None, tensors: dict[str, torch.Tensor | None], entry: dict,
               writer: _TensorWriter, column_cache: dict, columns: dict[str, torch.Tensor] | None = None) -> None:
    """Make `version` current with these tensors (None = remove), keeping the undo back to `restores`.
    `columns` names, per tensor kept by column, the only columns that may differ from what is stored."""
    meta = dbs["meta"]
    sums = json.loads(txn.get(b"tensor_sums", db=meta))
    by_column = json.loads(txn.get(b"manifest", db=meta)).get("column_tensors", [])
    undo_sums = {}
    for name, tensor in tensors.items():
        if tensor is not None and name in by_column and _column_keepable(tensor):
            written = _put_by_column(env, txn, dbs, name, tensor, sums.get(name), column_cache, restores is not None,
                                     (columns or {}).get(name))
        else:
            written = _put_whole(env, txn, dbs, name, tensor, sums.get(name), writer, restores is not None)
        if written is None:  # unchanged
            continue
        digest, undo = written
        if undo is not None:
            txn.put(_id_key(version) + name.encode(), undo, db=dbs["history"])
            undo_sums[name] = _sha(undo)
        if digest is None:
            sums.pop(name, None)
        else:
            sums[name] = digest
    txn.put(b"tensor_sums", _dumps(sums), db=meta)
    txn.put(b"edits", str(entry["edits"]).encode(), db=meta)
    txn.put(b"version", str(version).encode(), db=meta)
    _put_version(txn, dbs, {"version": version, "restores": restores, "tensor_sums": sums, "undo_sums": undo_sums, **entry})


def _put_whole(env, txn, dbs: dict, name: str, tensor: torch.Tensor | None, stored_sum: str | None, writer: _TensorWriter,
               keep_undo: bool) -> tuple[str | None, bytes | None] | None:
    """Store `tensor` as one safetensors value (None: remove it). Returns (its checksum, the undo)
    or None when that is what is stored already."""
    data = None if tensor is None else writer(tensor)
    digest = None if data is None else _sha(data)
    if digest is not None and digest == stored_sum:
        return None
    undo = None
    if keep_undo:
        with _stored(env, txn, dbs, name) as old:
            undo = save_tensors(_undo(old, tensor))
    _drop_columns(txn, dbs, name)
    if data is None:
        txn.delete(name.encode(), db=dbs["tensors"])
    else:
        txn.put(name.encode(), data, db=dbs["tensors"])
    return digest, undo


# --- tensors kept by column ------------------------------------------------------------------------
# In the `columns` database, per tensor: b"d<name>\0" its descriptor (dtype, shape), b"h<name>\0" the
# SHA-256 of every column (32 bytes each, in order) and b"c<name>\0<column, >Q>" each column of its
# 2-D view [shape[0], rest] as raw bytes. Its checksum is the SHA-256 of descriptor + column hashes.
def _column_key(kind: bytes, name: str, column: int | None = None) -> bytes:
    key = kind + name.encode() + b"\0"
    return key if column is None else key + struct.pack(">Q", column)


def _column_keepable(tensor: torch.Tensor) -> bool:
    return tensor.dim() >= 2 and tensor.numel() > 0


def _column_descriptor(tensor: torch.Tensor) -> bytes:
    return _dumps({"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape)})


def _column_bytes(tensor: torch.Tensor, columns: torch.Tensor) -> np.ndarray:
    """Rows of raw bytes, one per column in `columns` of the tensor's 2-D view."""
    flat = tensor.detach().cpu().reshape(tensor.shape[0], -1)
    return flat.t()[columns].contiguous().view(torch.uint8).numpy()


def _hashes(raw: np.ndarray) -> bytes:
    return b"".join(hashlib.sha256(row).digest() for row in raw)


def _checksum(tensor: torch.Tensor, by_column: bool) -> str:
    """The checksum `tensor_sums` records for `tensor`, kept by column (if it can be) or whole."""
    if not (by_column and _column_keepable(tensor)):
        return _sha(_tensor_bytes(tensor))
    columns = torch.arange(tensor.numel() // tensor.shape[0])
    return _sha(_column_descriptor(tensor) + _hashes(_column_bytes(tensor, columns)))


def _stored_descriptor(txn, dbs: dict, name: str) -> bytes | None:
    """The descriptor of the tensor kept by column under `name` (None: not kept by column)."""
    return txn.get(_column_key(b"d", name), db=dbs[COLUMN_DATABASE]) if COLUMN_DATABASE in dbs else None


def _column_layout(descriptor: bytes) -> tuple[torch.dtype, list[int], int]:
    """dtype, shape and column count of a stored descriptor."""
    meta = json.loads(descriptor)
    return SAFETENSORS_DTYPES[meta["dtype"]], meta["shape"], math.prod(meta["shape"]) // meta["shape"][0]


def _read_columns(txn, dbs: dict, name: str) -> torch.Tensor | None:
    """The tensor kept by column under `name` (None: not kept by column), as a new tensor."""
    descriptor = _stored_descriptor(txn, dbs, name)
    if descriptor is None:
        return None
    dtype, shape, count = _column_layout(descriptor)
    parts = [value for _, value in _prefixed(txn, dbs[COLUMN_DATABASE], _column_key(b"c", name))]
    if len(parts) != count:
        raise StoreError(f"tensor {name}: {count} columns expected, {len(parts)} stored or sized wrong; run `store verify`")
    return _joined_columns(name, parts, dtype, shape[0]).contiguous().reshape(shape)


def _joined_columns(name: str, parts: list[bytes | None], dtype: torch.dtype, rows: int) -> torch.Tensor:
    """Stored column values side by side: [rows, len(parts)]."""
    if any(part is None or len(part) != rows * dtype.itemsize for part in parts):
        raise StoreError(f"tensor {name}: a stored column is missing or sized wrong; run `store verify`")
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=dtype).reshape(len(parts), rows).t()


def _drop_columns(txn, dbs: dict, name: str) -> None:
    if _stored_descriptor(txn, dbs, name) is None:
        return
    db = dbs[COLUMN_DATABASE]
    for kind in (b"d", b"h"):
        txn.delete(_column_key(kind, name), db=db)
    for key in [key for key, _ in _prefixed(txn, db, _column_key(b"c", name))]:
        txn.delete(key, db=db)


@contextlib.contextmanager
def _stored(env, txn, dbs: dict, name: str, cached: torch.Tensor | None = None) -> Iterator[torch.Tensor | None]:
    """The tensor stored under `name` as `txn` sees it (None: none), for as long as the block runs:
    `cached` if given (the caller checked it), else assembled from its columns or read in place."""
    if cached is None:
        cached = _read_columns(txn, dbs, name)
    if cached is not None:
        yield cached
        return
    with _stored_view(env, txn, dbs["tensors"], name.encode()) as view:
        yield view


def _put_by_column(env, txn, dbs: dict, name: str, tensor: torch.Tensor, stored_sum: str | None, cache: dict,
                   keep_undo: bool, columns: torch.Tensor | None = None) -> tuple[str, bytes | None] | None:
    """Store `tensor` by column, writing only the columns that differ from the stored ones. Returns
    (its checksum, the undo) or None when nothing changed. `columns`, when given, are the only columns
    that may differ (the caller knows what it trained): only those are read and compared, and no copy
    is kept. Otherwise `cache` keeps, per name, the checksum and the tensor this process last stored:
    while the store's checksum is that one, it stands in for the stored tensor and the diff needs no
    read (it is updated in place to what was written)."""
    tensor = tensor.detach().cpu()
    cached_sum, cached = cache.pop(name, (None, None))  # put back only once this write went through
    db = dbs[COLUMN_DATABASE]
    descriptor = _column_descriptor(tensor)
    count = tensor.numel() // tensor.shape[0]
    partial = _stored_descriptor(txn, dbs, name) == descriptor  # kept by column already, same shape and dtype
    hashes = bytearray(txn.get(_column_key(b"h", name), db=db)) if partial else bytearray(32 * count)
    if partial and columns is not None:
        return _put_named_columns(txn, db, name, tensor, columns, descriptor, hashes, keep_undo)
    with _stored(env, txn, dbs, name, cached if cached_sum == stored_sum else None) as old:
        change = _undo(old, tensor)
        if partial and "cols" in change and change["cols"].numel() == 0:
            cache[name] = (stored_sum, old)
            return None
        undo = save_tensors(change) if keep_undo else None
        if partial:
            columns = _changed_columns(change, count)
            current = old  # our own tensor (the cache or just assembled), made what is written
            current.view(current.shape[0], -1)[:, columns] = tensor.reshape(tensor.shape[0], -1)[:, columns]
    if not partial:
        txn.delete(name.encode(), db=dbs["tensors"])
        _drop_columns(txn, dbs, name)
        txn.put(_column_key(b"d", name), descriptor, db=db)
        columns, current = torch.arange(count), tensor.clone(memory_format=torch.contiguous_format)
    digest = _write_columns(txn, db, name, tensor, columns, descriptor, hashes)
    cache[name] = (digest, current)
    return digest, undo


def _put_named_columns(txn, db, name: str, tensor: torch.Tensor, columns: torch.Tensor, descriptor: bytes,
                       hashes: bytearray, keep_undo: bool) -> tuple[str, bytes | None] | None:
    """`_put_by_column` when the caller names the only columns that may have changed: reads and
    compares just those, so a commit needs neither the whole stored tensor nor a copy of it."""
    dtype, shape, count = _column_layout(descriptor)
    columns = torch.unique(columns.detach().cpu().long())
    if not columns.numel():
        return None
    if not 0 <= int(columns[0]) <= int(columns[-1]) < count:
        raise ValueError(f"tensor {name}: columns outside 0..{count - 1}")
    old = _joined_columns(name, [txn.get(_column_key(b"c", name, j), db=db) for j in columns.tolist()], dtype, shape[0])
    differ = (old != tensor.reshape(shape[0], -1)[:, columns]).any(0)
    if not differ.any():
        return None
    columns = columns[differ]
    undo = save_tensors({"cols": columns, "values": old[:, differ].contiguous()}) if keep_undo else None
    return _write_columns(txn, db, name, tensor, columns, descriptor, hashes), undo


def _write_columns(txn, db, name: str, tensor: torch.Tensor, columns: torch.Tensor, descriptor: bytes,
                   hashes: bytearray) -> str:
    """Put `columns` of `tensor` and their hashes; returns the tensor's new checksum."""
    raw = _column_bytes(tensor, columns)
    for column, row in zip(columns.tolist(), raw):
        txn.put(_column_key(b"c", name, column), row, db=db)
        hashes[32 * column : 32 * column + 32] = hashlib.sha256(row).digest()
    txn.put(_column_key(b"h", name), bytes(hashes), db=db)
    return _sha(descriptor + bytes(hashes))


def _changed_columns(change: dict[str, torch.Tensor], count: int) -> torch.Tensor:
    """The columns an `_undo` of a same-shaped tensor covers."""
    if "cols" in change:
        return change["cols"]
    if "entries" in change:
        return torch.unique(change["entries"].long() % count)
    return torch.arange(count)  # rows


def _current_tensors(txn, dbs: dict) -> dict[str, torch.Tensor]:
    tensors = {name.decode(): _load_tensor(value) for name, value in txn.cursor(db=dbs["tensors"])}
    if COLUMN_DATABASE in dbs:
        names = [key[1:-1].decode() for key, _ in _prefixed(txn, dbs[COLUMN_DATABASE], b"d")]
        tensors.update({name: _read_columns(txn, dbs, name) for name in names})
    return tensors


def _verify_columns(txn, dbs: dict, name: str, expected: str) -> list[str]:
    db = dbs[COLUMN_DATABASE]
    descriptor, hashes = _stored_descriptor(txn, dbs, name), txn.get(_column_key(b"h", name), db=db) or b""
    dtype, shape, count = _column_layout(descriptor)
    size = shape[0] * dtype.itemsize
    stored = list(_prefixed(txn, db, _column_key(b"c", name)))
    if _sha(descriptor + hashes) != expected or len(hashes) != 32 * count:
        return [f"tensor {name}: checksum mismatch"]
    if [key for key, _ in stored] != [_column_key(b"c", name, j) for j in range(count)]:
        return [f"tensor {name}: columns missing ({len(stored)} of {count} stored)"]
    damaged = [j for j, (_, value) in enumerate(stored) if len(value) != size or hashlib.sha256(value).digest() != hashes[32 * j : 32 * j + 32]]
    return [f"tensor {name}: {len(damaged)} columns damaged (first: {damaged[0]})"] if damaged else []


def _version_entry(txn, dbs: dict, version: int) -> dict | None:
    value = txn.get(_id_key(version), db=dbs["versions"])
    return None if value is None else json.loads(value)


def _prefixed(txn, db, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of every key starting with `prefix`, in key order."""
    cursor = txn.cursor(db=db)
    if cursor.set_range(prefix):
        for key, value in cursor:
            if not key.startswith(prefix):
                break
            yield key, value


def _undos(txn, dbs: dict, version: int) -> Iterator[tuple[str, bytes]]:
    """(tensor name, undo bytes) stored for `version`."""
    prefix = _id_key(version)
    for key, value in _prefixed(txn, dbs["history"], prefix):
        yield key[len(prefix):].decode(), bytes(value)


def _replay(txn, dbs: dict, state: dict[str, torch.Tensor], current: int, target: int) -> dict[str, torch.Tensor]:
    """The tensors of version `target`, from `state` (those of `current`) and the undos in between."""
    version = current
    while version > target:
        for name, undo in _undos(txn, dbs, version):
            restored = _apply_undo(state.get(name), load_tensors(undo))
            if restored is None:
                state.pop(name, None)
            else:
                state[name] = restored
        version = _version_entry(txn, dbs, version)["restores"]
    return state


def _active_versions(txn, dbs: dict, version: int) -> list[int]:
    """The commit versions of the edits active at `version`, in edit-id order."""
    tail = []
    while True:
        entry = _version_entry(txn, dbs, version)
        if "active" in entry or entry["op"] in ("create", "baseline"):  # where the kept history starts
            return entry.get("active", []) + tail[::-1]
        if entry["op"] == "edit":
            tail.append(version)
            version -= 1
        else:  # rollback
            version = entry["to"]


def _verify_history(txn, dbs: dict, records: list[dict], sums: dict) -> list[str]:
    problems = []
    entries = {struct.unpack(">Q", k)[0]: json.loads(v) for k, v in txn.cursor(db=dbs["versions"])}
    current = int(txn.get(b"version", db=dbs["meta"]))
    if not entries or sorted(entries) != list(range(min(entries), current + 1)):
        return [f"versions kept are not every version from the first kept one to {current}"]
    if entries[current]["tensor_sums"] != sums or entries[current]["edits"] != len(records):
        problems.append(f"version {current}: history entry does not match the current tensors or edit count")
    stored = 0
    for version, entry in entries.items():
        for name, undo in _undos(txn, dbs, version):
            stored += 1
            if entry["undo_sums"].get(name) != _sha(undo):
                problems.append(f"version {version}: undo of tensor {name}: checksum mismatch")
    if stored != sum(len(e["undo_sums"]) for e in entries.values()):
        problems.append("history holds other undos than the versions list")
    if [r.get("version") for r in records] != _active_versions(txn, dbs, current):
        problems.append("the records are not the edits active at the current version")
    for record in records:
        journal = txn.get(_id_key(record.get("version", -1)), db=dbs["journal"])
        if journal is None or json.loads(journal)["record"] != record:
            problems.append(f"record {record.get('id')}: not in the journal as stored")
    return problems


def pack_keys(key: torch.Tensor) -> bytes:
    """An edit's routing key(s), [width] or [n, width] bool, as bits; each row padded to whole bytes."""
    rows = key.detach().cpu().reshape(-1, key.shape[-1]).numpy().astype(np.uint8)
    return np.packbits(rows, axis=1).tobytes()


def unpack_keys(value: bytes, width: int) -> np.ndarray:
    """Inverse of `pack_keys`: [n, width] bool."""
    packed = np.frombuffer(value, dtype=np.uint8).reshape(-1, (width + 7) // 8)
    return np.unpackbits(packed, axis=1)[:, :width].astype(bool)


def content_hash(fact: dict) -> str:
    return _sha(_dumps(fact))
