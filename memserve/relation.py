"""Relation keys: does a question ask the same thing as an edit, whatever its subject?

MEMOIR's routing key (TopHash of the prompt mean) and its subject anchor let any question naming an
edited subject reach that edit, whatever it asks about the subject (README "A measured limit"). No
raw statistic of the model's activations tells "X's mother tongue is" from "X was born in" (AUC
.50-.55). What does is the question's wording around the subject: a linear projection of the mean
input embedding of the routing span's tokens *outside the subjects it names* (`Mentions.rest`),
learned once per model, contrastively (a fact's rephrase above another question about the same
subject; held-out AUC .97, README "Relation check"). It needs no activation, so both runtimes
compute it on the host from the span's token ids; per token id the projected embedding is a table
(`RelationKey.with_embeddings`) kept with the store. `MemoirConfig.relation_check` then lets a named
edit be reached only by questions whose relation key is close to its own.

The projection is data of one model: `benchmarks/relation_key.py` trains it and writes the file
`RelationKey.shipped` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .models import DEFAULT_MODEL_NAME, ModelError


class RelationKeyError(ModelError):
    """No relation key fits this model."""


@dataclass
class RelationKey:
    centre: torch.Tensor  # [E] subtracted from a mean input embedding
    scale: torch.Tensor  # [E] then divided by
    weight: torch.Tensor  # [E, D] then projected with
    threshold: float  # minimum cosine of a question's and an edit's relation keys
    tokens: torch.Tensor | None = None  # [V, D] each token id's input embedding, scaled and projected

    def embed(self, means: torch.Tensor) -> torch.Tensor:
        """[N, E] mean input embeddings -> [N, D] unit vectors."""
        return F.normalize(((means.float() - self.centre) / self.scale) @ self.weight, dim=-1)

    def with_embeddings(self, embeddings: torch.Tensor) -> "RelationKey":
        """This key with its per-token table for a model's input embeddings [V, E]."""
        tokens = (embeddings.detach().float() / self.scale) @ self.weight
        return RelationKey(self.centre, self.scale, self.weight, self.threshold, tokens)

    @cached_property
    def offset(self) -> torch.Tensor:
        """[D] the centre's projection, which `tokens` leaves out: once per key, not per request."""
        return (self.centre / self.scale) @ self.weight

    def embed_tokens(self, token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """[N, D] the relation key of each token id list (`embed` of their mean input embedding);
        a zero vector for an empty list: it is close to nothing."""
        out = torch.zeros(len(token_lists), self.weight.shape[1])
        for row, ids in enumerate(token_lists):
            ids = [int(t) for t in ids if 0 <= int(t) < len(self.tokens)]
            if ids:
                out[row] = F.normalize(self.tokens[ids].mean(0) - self.offset, dim=-1)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        table = {} if self.tokens is None else {"relation-tokens": self.tokens}
        return {"relation-centre": self.centre, "relation-scale": self.scale, "relation-weight": self.weight,
                "relation-threshold": torch.tensor([self.threshold]), **table}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "RelationKey | None":
        if "relation-weight" not in tensors:
            return None
        if "relation-layer" in tensors:
            raise RelationKeyError("this store's relation check projects layer activations (a memserve version before "
                                   "token relation keys); make the store again with `memserve edit --set relation_check=true`")
        tokens = tensors.get("relation-tokens")
        return cls(tensors["relation-centre"].clone(), tensors["relation-scale"].clone(),
                   tensors["relation-weight"].clone(), float(tensors["relation-threshold"][0]),
                   None if tokens is None else tokens.clone())

    def save(self, path: str | Path) -> None:
        """The projection alone (the per-token table is the model's: `with_embeddings`)."""
        from safetensors.torch import save_file

        tensors = {name: t.contiguous() for name, t in self.tensors().items() if name != "relation-tokens"}
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "RelationKey":
        from safetensors.torch import load_file

        return cls.from_tensors(load_file(str(path)))

    @staticmethod
    def ships_for(model: str | None) -> bool:
        """Whether a relation key ships for `model` (a `models.model_id`: a name, or the path of a
        local model, which has none; None: not told)."""
        return model is not None and "/" not in model and shipped_path(model).is_file()

    @classmethod
    def shipped(cls, model: str | None, embeddings: torch.Tensor) -> "RelationKey":
        """The relation key shipped for `model` (a `models.model_id`), with the table of its input
        embeddings [V, E]."""
        if not cls.ships_for(model):
            raise RelationKeyError(f"relation_check: no relation key ships for {model} (only {DEFAULT_MODEL_NAME}); "
                                   "benchmarks/relation_key.py trains one")
        with resources.as_file(shipped_path(model)) as path:
            key = cls.load(path)
        if key.centre.numel() != embeddings.shape[1]:
            raise RelationKeyError(f"relation_check: the {model} relation key is for {key.centre.numel()}-wide "
                                   f"input embeddings, not {embeddings.shape[1]}")
        return key.with_embeddings(embeddings)


def shipped_path(model: str):
    """Where the relation key of `model` ships inside the package (it may not exist)."""
    return resources.files("memserve") / "data" / f"relation_key_{model}.safetensors"


def fit_relation_key(edits: torch.Tensor, rephrases: torch.Tensor, questions: torch.Tensor, owner: torch.Tensor,
                     calibration: tuple[torch.Tensor, torch.Tensor], dim: int = 128, steps: int = 400,
                     keep: float = 0.95, seed: int = 0) -> RelationKey:
    """Learn a projection under which each edit's mean input embedding (`edits` [N, E], its prompt's
    tokens outside its subject) is closer to its own rephrase's (`rephrases` [N, E]) than to another
    question about its subject (`questions` [Q, E], asking about the subject of edit `owner[q]`). The
    threshold keeps a share `keep` of the rephrases of other facts (`calibration`: their edits' and
    rephrases' means): on the training facts the projection keeps far more of them than on new ones."""
    generator = torch.Generator().manual_seed(seed)
    pooled = torch.cat([edits, rephrases, questions]).float()
    centre, scale = pooled.mean(0), pooled.std(0) + 1e-4
    key = RelationKey(centre, scale, 0.01 * torch.randn(edits.shape[1], dim, generator=generator), 0.0)
    key.weight.requires_grad_(True)
    optimiser = torch.optim.Adam([key.weight], lr=1e-3)
    for _ in range(steps):
        e, r, q = key.embed(edits), key.embed(rephrases), key.embed(questions)
        own, other = (e * r).sum(-1), (e[owner] * q).sum(-1)
        loss = F.softplus(-10 * (own[owner] - other)).mean() + 1e-4 * key.weight.pow(2).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    key.weight = key.weight.detach()
    with torch.no_grad():
        kept = (key.embed(calibration[0]) * key.embed(calibration[1])).sum(-1)
        key.threshold = float(torch.quantile(kept, 1 - keep))
    return key
