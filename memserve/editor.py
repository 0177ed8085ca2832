"""Sequential editing into a store: the library behind `memserve edit`.

`open_session` loads the base model, opens (or creates) the store, checks they belong together and
rebuilds the memory from the store. `EditSessionRunner.apply` learns facts one by one and commits each
edit with the memory state it produced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from memserve.store import Store, StoreError, content_hash

from .facts import Fact, FactsError
from .hf import EditedModel
from .methods import EditMemory, memory_class
from .models import DEFAULT_MODEL_NAME, default_model_dir, down_proj, load_model, model_id, resolve_model, weight_hash
from .subjects import name_continues
from .training import capture, edit_batch, generate_prefixes, train_edit

DEFAULT_METHOD = "memoir"


def background_prompts() -> list[str]:
    text = resources.files("memserve").joinpath("data/background_prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def store_model_dir(store: Store) -> Path:
    recorded = store.manifest["model"]
    return default_model_dir() if recorded == DEFAULT_MODEL_NAME else Path(recorded)


def build_memory(method: str, config_values: dict, base_weight: torch.Tensor) -> EditMemory:
    cls = memory_class(method)
    return cls(cls.config_class.from_stored(config_values), base_weight)


def load_memory(store: Store, base_weight: torch.Tensor) -> EditMemory:
    """The memory as of the store's current version."""
    m = store.manifest
    memory = build_memory(m["method"], m["config"], base_weight)
    memory.load_state(store.tensors(), *store.routing_keys(base_weight.shape[1]))
    memory.load_anchors([(record.get("anchors", []), record.get("anchor_suffices", False),
                          bool(record.get("anchors")) and name_continues(record["fact"]["prompt"], record["fact"].get("subject")))
                         for record in store.records()])
    return memory


def background_mean(edited: EditedModel) -> torch.Tensor:
    """Mean down_proj input over unrelated prompts (MEMOIR decentres its masks with it)."""
    total, count = None, 0
    for prompt in background_prompts():
        ids = torch.tensor([edited.encode(prompt)])
        a, _, _ = capture(edited, ids)
        total = a[0].sum(0) if total is None else total + a[0].sum(0)
        count += a.shape[1]
    return total / count


def check_lengths(tokenizer, facts: list[Fact], limit: int) -> None:
    """Training prepends a prefix of up to ~15 tokens; the whole sequence must fit the model."""
    margin = 32
    for fact in facts:
        length = len(tokenizer(fact.prompt + " " + fact.target, add_special_tokens=False)["input_ids"])
        if length + margin > limit:
            raise FactsError(f"{fact.where}: field 'prompt': prompt + target is {length} tokens; the model takes at most {limit - margin} here")


@dataclass
class EditReport:
    added: int = 0
    skipped: int = 0
    total: int = 0  # edits in the store afterwards
    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    unconverged: int = 0  # edits that ran all their steps without reaching the stop loss


class EditSessionRunner:
    """A base model, its store and the memory rebuilt from it."""

    def __init__(self, store: Store, edited: EditedModel, version: int):
        self.store, self.edited = store, edited
        self.version = version  # the store version the memory was loaded from (see Store.commit_edits)
        self.prefixes: list[str] = store.manifest["prefixes"]
        self.out_of_scope = background_prompts()
        self._stored: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (tensor, its version counter) as stored
        self._mark_stored(edited.memory.state_tensors())  # the memory was just loaded from (or written into) the store
        # columns of the memory's column tensors changed since the last commit (None: unknown, the store
        # compares all); kept until a commit goes through, so a failed one cannot hide them from the next
        self._unstored_columns: dict[str, torch.Tensor] | None = {}

    def _changed_state(self) -> dict[str, torch.Tensor]:
        """The memory's tensors that are not, as the same object at the same version counter, what this
        session last stored. Only those are committed (the store keeps the others): MEMOIR adds one
        small reading per edit, and re-serialising a thousand unchanged ones cost every commit more."""
        def unchanged(name: str, tensor: torch.Tensor) -> bool:
            stored, version = self._stored.get(name, (None, -1))
            return stored is tensor and version == tensor._version

        return {name: t for name, t in self.edited.memory.state_tensors().items() if not unchanged(name, t)}

    def _mark_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        self._stored.update({name: (t, t._version) for name, t in tensors.items()})

    def _note_columns(self, written: dict[str, torch.Tensor] | None) -> None:
        if self._unstored_columns is None or written is None:
            self._unstored_columns = None
            return
        for name, columns in written.items():
            earlier = self._unstored_columns.get(name)
            self._unstored_columns[name] = columns if earlier is None else torch.cat([earlier, columns])

    def apply(self, facts: list[Fact], progress: Callable[[Fact, str, dict], None] | None = None, naive: bool = False,
              by: dict | None = None) -> EditReport:
        """Edit `facts` in order; `progress(fact, "added" | "skipped", record)` follows each one, an
        added record being already committed. Each record keeps the fact's file and line (`source`)
        and `by` (who asked: user, host, command) for the store's log."""
        report = EditReport()
        for fact in facts:
            stored = self.store.find(fact.key)
            if stored is not None:
                report.skipped += 1
                if progress:
                    progress(fact, "skipped", self.store.record(stored))
                continue
            # out-of-scope rows feed WISE's routing hinge loss; MEMOIR's loss never reads them
            count = getattr(self.edited.memory.config, "negatives", 0)
            pool, first = self.out_of_scope, self.store.num_edits * count
            negatives = [(pool[(first + j) % len(pool)], "") for j in range(count)]
            batch = edit_batch(self.edited, fact, self.prefixes, negatives)
            outcome = train_edit(self.edited, batch, naive=naive)
            key = outcome.record.pop("key", None)
            payload = fact.to_dict()
            record = {
                "fact_key": fact.key, "prompt_key": fact.prompt_key, "fact": payload, "content_hash": content_hash(payload),
                "loss": outcome.loss, "steps": outcome.steps, "seconds": outcome.seconds, "converged": outcome.converged,
                "step_dtype": outcome.step_dtype, **outcome.record,
                "source": fact.where, **({"by": by} if by else {}),
            }
            changed = self._changed_state()
            self._note_columns(outcome.columns)
            edit_id = self.store.commit_edit(record, key, changed, self.version, self._unstored_columns)
            self._mark_stored(changed)
            self._unstored_columns = {}
            self.version += 1
            report.added += 1
            report.seconds.append(outcome.seconds)
            report.losses.append(outcome.loss)
            report.unconverged += not outcome.converged
            if progress:
                progress(fact, "added", self.store.record(edit_id))
        report.total = self.store.num_edits
        return report


def load_reference(store_path: str | Path, dtype: torch.dtype = torch.float32) -> EditedModel:
    """The transformers reference of the store's current version with the base model in `dtype`, for
    inference only (edit with `open_session`). The fp32 checkpoint is loaded and checked against the
    store, then cast, as vLLM casts it for `--dtype bfloat16`; the memory stays fp32, as in the plugin."""
    with Store.open(store_path) as store:
        m = store.manifest
        model_dir = resolve_model(store_model_dir(store))
        model, tokenizer = load_model(model_dir)
        base = down_proj(model, m["layer"]).weight
        store.check_compatible(model_id(model_dir), weight_hash(base))
        memory = load_memory(store, base.detach().clone())
    memory.eval()
    model.to(dtype)  # before the memory is attached: its tensors stay fp32
    return EditedModel(model, tokenizer, memory, m["layer"])


def open_session(
    store_path: str | Path,
    model_path: str | Path | None = None,
    method: str | None = None,
    config: dict | None = None,
    create: bool = True,
    facts: list[Fact] = (),
) -> EditSessionRunner:
    """Open `store_path` (creating it when missing and `create`) with its base model. `facts` are
    checked against the model (length) before anything is written."""
    existing = Store.exists(store_path)
    if not existing and not create:
        raise StoreError(f"{store_path}: no store here")
    store = Store.open(store_path) if existing else None
    try:
        return _start(store, store_path, model_path, method, config, facts)
    except BaseException:
        if store is not None:
            store.close()
        raise


def _start(store, store_path, model_path, method, config, facts) -> EditSessionRunner:
    if model_path is None and store is not None:
        model_path = store_model_dir(store)
    model_dir = resolve_model(model_path)
    model, tokenizer = load_model(model_dir)
    check_lengths(tokenizer, facts, model.config.max_position_embeddings)
    if store is not None:
        m = store.manifest
        if method is not None and method != m["method"]:
            raise StoreError(f"{store_path}: store holds {m['method']} edits, not {method}; use another --store")
        if config:
            differing = {k: v for k, v in config.items() if m["config"].get(k) != v}
            if differing:
                raise StoreError(f"{store_path}: options are fixed when a store is created; differing: {differing}")
        base = down_proj(model, m["layer"]).weight
        store.check_compatible(model_id(model_dir), weight_hash(base))
        version = store.version  # read before the memory: a commit in between makes ours refused, not lost
        memory = load_memory(store, base)
        return EditSessionRunner(store, EditedModel(model, tokenizer, memory, m["layer"]), version)

    method = method or DEFAULT_METHOD
    cls = memory_class(method)
    cfg = cls.config_class.from_dict(config or {})
    base = down_proj(model, cfg.layer).weight
    memory = cls(cfg, base)
    edited = EditedModel(model, tokenizer, memory, cfg.layer)
    memory.calibrate(background_mean(edited), model_id(model_dir), model.get_input_embeddings().weight)
    manifest = {
        "model": model_id(model_dir), "layer": cfg.layer, "method": method, "config": dataclasses.asdict(memory.config),
        "weight_hash": weight_hash(base), "hidden_size": memory.hidden_size,
        "intermediate_size": memory.intermediate_size, "prefixes": generate_prefixes(edited, cfg.training_prefixes),
    }
    store = Store.create(store_path, manifest, memory.state_tensors(), by_column=memory.column_tensors)
    return EditSessionRunner(store, edited, store.version)
