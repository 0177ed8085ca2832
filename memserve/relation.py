"""Relation keys: does a question ask the same thing as an edit, whatever its subject?

MEMOIR's routing key (TopHash of the prompt mean) and its subject anchor let any question naming an
edited subject reach that edit, whatever it asks about the subject (README "A measured limit"). No
raw statistic of the model's activations tells "X's mother tongue is" from "X was born in" (AUC
.50-.55); a linear projection of the prompt mean learned once per model, contrastively (a fact's
rephrase above another question about the same subject), does in part (held-out AUC .90-.95, README
"Relation check"). `MemoirConfig.relation_check`
then lets a named edit be reached only by questions whose projected prompt mean is close to its own.

The projection is data of one model and one layer: `benchmarks/relation_key.py` trains it and writes
the file `RelationKey.shipped` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from .models import DEFAULT_MODEL_NAME, ModelError


class RelationKeyError(ModelError):
    """No relation key fits this model and layer."""


@dataclass
class RelationKey:
    centre: torch.Tensor  # [I] subtracted from a prompt mean
    scale: torch.Tensor  # [I] then divided by
    weight: torch.Tensor  # [I, D] then projected with
    threshold: float  # minimum cosine of a question's and an edit's projected means
    layer: int

    def embed(self, means: torch.Tensor) -> torch.Tensor:
        """[N, I] prompt means -> [N, D] unit vectors."""
        return F.normalize(((means.float() - self.centre) / self.scale) @ self.weight, dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"relation-centre": self.centre, "relation-scale": self.scale, "relation-weight": self.weight,
                "relation-threshold": torch.tensor([self.threshold]), "relation-layer": torch.tensor([self.layer])}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "RelationKey | None":
        if "relation-weight" not in tensors:
            return None
        return cls(tensors["relation-centre"].clone(), tensors["relation-scale"].clone(),
                   tensors["relation-weight"].clone(), float(tensors["relation-threshold"][0]),
                   int(tensors["relation-layer"][0]))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({name: t.contiguous() for name, t in self.tensors().items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "RelationKey":
        from safetensors.torch import load_file

        return cls.from_tensors(load_file(str(path)))

    @classmethod
    def shipped(cls, model: str | None, layer: int, width: int) -> "RelationKey":
        """The relation key shipped for `model` (a `models.model_id`) at `layer`."""
        if model != DEFAULT_MODEL_NAME:  # None: not told
            raise RelationKeyError(f"relation_check: no relation key ships for {model} (only {DEFAULT_MODEL_NAME}); "
                                   "benchmarks/relation_key.py trains one")
        with resources.as_file(resources.files("memserve") / "data" / shipped_file(model)) as path:
            key = cls.load(path)
        if key.layer != layer or key.centre.numel() != width:
            raise RelationKeyError(f"relation_check: the {model} relation key is for layer {key.layer} "
                                   f"({key.centre.numel()} features), not layer {layer} ({width})")
        return key


def shipped_file(model: str) -> str:
    return f"relation_key_{model}.safetensors"


def fit_relation_key(edits: torch.Tensor, rephrases: torch.Tensor, questions: torch.Tensor, owner: torch.Tensor,
                     calibration: tuple[torch.Tensor, torch.Tensor], layer: int, dim: int = 64, steps: int = 100,
                     keep: float = 0.95, seed: int = 0) -> RelationKey:
    """Learn a projection under which each edit's prompt mean (`edits` [E, I]) is closer to its own
    rephrase's (`rephrases` [E, I]) than to another question about its subject (`questions` [Q, I],
    asking about the subject of edit `owner[q]`). The threshold keeps a share `keep` of the rephrases
    of other facts (`calibration`: their edits' and rephrases' means): on the training facts the
    projection keeps far more of them than on new ones."""
    generator = torch.Generator().manual_seed(seed)
    pooled = torch.cat([edits, rephrases, questions]).float()
    centre, scale = pooled.mean(0), pooled.std(0) + 1e-4
    key = RelationKey(centre, scale, 0.01 * torch.randn(edits.shape[1], dim, generator=generator), 0.0, layer)
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
