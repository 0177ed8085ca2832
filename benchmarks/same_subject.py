"""Same subject, another question: does an edit reach questions that name its subject but ask
something else ("Toko Yasuda speaks" after an edit of the instrument Toko Yasuda plays)?

`probes` writes, for each fact with a subject, questions built from *other* facts' prompt templates
with this fact's subject put in: templates that share no content word with its own prompt and come
from facts with another answer, so they ask another relation (some are odd for the subject: "X
passed away in" for a school; they still name it). Score them against a store as never-edited
questions (`memserve eval ... --unedited`): share reaching an edit, answer tokens unchanged.

`separability` asks whether the model's activations could tell them apart at all: at every layer,
how often a fact's rephrase (its last sentence, as routing falls back to) is closer to the fact's
prompt than a same-subject probe is (AUC, per fact), for the prompt mean, the last prompt token and
the mean without the subject's tokens, and the share of probes as close as 90% of the rephrases.

    .venv/bin/python benchmarks/same_subject.py probes benchmarks/data/counterfact_dev.jsonl \
        --out benchmarks/data/counterfact_same_subject.jsonl
    .venv/bin/memserve eval benchmarks/data/counterfact_dev.jsonl --limit 1 --store <store> --no-generation \
        --unedited benchmarks/data/counterfact_same_subject.jsonl --json benchmarks/results/same_subject_counterfact_memoir.json
    .venv/bin/python benchmarks/same_subject.py separability benchmarks/data/counterfact_dev.jsonl \
        --probes benchmarks/data/counterfact_same_subject.jsonl \
        --json benchmarks/results/same_subject_separability.json --plot benchmarks/results/same_subject_separability.png
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import torch

from memserve.chat import ChatFormat
from memserve.facts import Fact, read_facts
from memserve.machine import describe
from memserve.models import load_model

SLOT = "\0"  # where a template's subject was
FUNCTION_WORDS = frozenset(
    "the of is a an in was by to and that which who what it its as on at for with has his her their from be are were "
    "where when does did do".split())


def template(fact: Fact) -> str | None:
    """The fact's prompt with its subject replaced by `SLOT` (None: no subject, or not exactly once)."""
    if not fact.subject or fact.prompt.count(fact.subject) != 1:
        return None
    return fact.prompt.replace(fact.subject, SLOT)


def content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z]+", text.lower()) if w not in FUNCTION_WORDS)


def same_subject_probes(facts: list[Fact], per_fact: int = 2, seed: int = 0) -> list[dict]:
    """`per_fact` questions per fact naming its subject in another fact's template (module doc)."""
    bank: dict[str, Fact] = {}
    for fact in facts:
        bank.setdefault(template(fact) or "", fact)
    bank.pop("", None)
    rng = random.Random(seed)
    probes = []
    for fact in facts:
        own = template(fact)
        if own is None:
            continue
        words = content_words(own)
        pool = [(t, other) for t, other in bank.items()
                if t != own and not content_words(t) & words and other.target != fact.target]
        for text, other in rng.sample(pool, min(per_fact, len(pool))):
            probes.append({"prompt": text.replace(SLOT, fact.subject), "target_new": other.target,
                           "subject": fact.subject, "edit": fact.where})
    return probes


@torch.no_grad()
def statistics(model, tokenizer, texts: list[str], subjects: list[str], batch: int = 48) -> dict[str, torch.Tensor]:
    """Per text, at every layer's residual stream: the mean over its tokens, its last token, and the
    mean over the tokens outside its subject: {kind: [layers, texts, H]}."""
    out: dict[str, list[torch.Tensor]] = {"mean": [], "last": [], "without_subject": []}
    padding, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        for start in range(0, len(texts), batch):
            chunk, names = texts[start : start + batch], subjects[start : start + batch]
            enc = tokenizer(chunk, add_special_tokens=False, padding=True, return_tensors="pt", return_offsets_mapping=True)
            offsets = enc.pop("offset_mapping")
            states = torch.stack(model(**enc, output_hidden_states=True).hidden_states[1:]).float()  # [L, B, T, H]
            mask = enc["attention_mask"].bool()
            for row, (text, name) in enumerate(zip(chunk, names)):
                lo = text.rfind(name)
                inside = torch.tensor([lo >= 0 and a < lo + len(name) and b > lo for a, b in offsets[row].tolist()])
                outside = mask[row] & ~inside if (mask[row] & ~inside).any() else mask[row]
                out["mean"].append(states[:, row, mask[row]].mean(1))
                out["last"].append(states[:, row, int(mask[row].sum()) - 1])
                out["without_subject"].append(states[:, row, outside].mean(1))
    finally:
        tokenizer.padding_side = padding
    return {kind: torch.stack(rows, 1) for kind, rows in out.items()}


def separability(facts: list[Fact], probes: list[dict]) -> dict:
    model, tokenizer = load_model()
    chat = ChatFormat(tokenizer)
    facts = [f for f in facts if f.rephrases and template(f)]
    by_place = {f.where: i for i, f in enumerate(facts)}
    probes = [p for p in probes if p["edit"] in by_place]

    def last_sentence(text: str) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[chat.last_sentence_start(ids):]).strip()

    subjects = [f.subject for f in facts]
    edits = statistics(model, tokenizer, [f.prompt for f in facts], subjects)
    rephrases = statistics(model, tokenizer, [last_sentence(f.rephrases[0]) for f in facts], subjects)
    asked = statistics(model, tokenizer, [p["prompt"] for p in probes], [p["subject"] for p in probes])
    owner = torch.tensor([by_place[p["edit"]] for p in probes])
    layers = []
    for layer in range(edits["mean"].shape[0]):
        row = {"layer": layer + 1}
        for kind in edits:
            e, r, q = edits[kind][layer], rephrases[kind][layer], asked[kind][layer]
            centre = torch.cat([e, r, q]).mean(0)
            own = torch.cosine_similarity(r - centre, e - centre, dim=-1)
            other = torch.cosine_similarity(q - centre, e[owner] - centre, dim=-1)
            row[f"{kind}_auc"] = float((own[owner] > other).float().mean())
            row[f"{kind}_probes_at_90pct_rephrases"] = float((other >= torch.quantile(own, 0.1)).float().mean())
        layers.append(row)
        print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    return {"facts": len(facts), "probes": len(probes), "layers": layers, "machine": describe()}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r["layer"] for r in result["layers"]]
    for kind, style in (("mean", "o-"), ("last", "s-"), ("without_subject", "^-")):
        ax.plot(x, [r[f"{kind}_auc"] for r in result["layers"]], style, label=f"{kind}: AUC rephrase vs same-subject question")
        ax.plot(x, [r[f"{kind}_probes_at_90pct_rephrases"] for r in result["layers"]], style.replace("-", ":"),
                label=f"{kind}: questions as close as 90% of rephrases")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xlabel("layer (residual stream after it)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Another question about an edited subject vs a rephrase ({result['facts']} facts)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("probes", help="write same-subject questions for a facts file")
    make.add_argument("facts", type=Path)
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--per-fact", type=int, default=2)
    make.add_argument("--seed", type=int, default=0)
    measure = sub.add_parser("separability", help="could activations tell rephrases from same-subject questions")
    measure.add_argument("facts", type=Path)
    measure.add_argument("--probes", type=Path, required=True)
    measure.add_argument("--json", type=Path, required=True)
    measure.add_argument("--plot", type=Path)
    args = parser.parse_args()

    facts, _ = read_facts(args.facts, skip_invalid=True)
    if args.command == "probes":
        probes = same_subject_probes(facts, args.per_fact, args.seed)
        args.out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in probes))
        print(f"{len(probes)} questions for {len({p['edit'] for p in probes})} facts -> {args.out}")
        return
    probes = [json.loads(line) for line in args.probes.read_text().splitlines()]
    result = separability(facts, probes)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
