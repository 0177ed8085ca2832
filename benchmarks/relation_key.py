"""Train the relation key of the default model (`memserve.relation`) and measure it on held-out facts.

The key is trained on the facts of the given files whose line number is at most `--train-lines`
(CounterFact and ZsRE, each with its same-subject questions from `same_subject.py probes`): the mean
input embedding of an edit prompt's routing-span tokens outside its subject (`Mentions.rest`, as
`edit_batch` gives each routing key) should be closer to its rephrase's (its last sentence, as
routing falls back to) than to another question about its subject, written and as chat turns (the
edit's chat key, the others asked as chat turns). Its threshold keeps 95% of the rephrases (both
forms) of the facts after that line up to `--calibration-lines` (not trained on; the number of steps
and dimensions were chosen on them too). It is measured on the facts after those, per form: AUC,
share of rephrases kept and of questions let through at the key's threshold; and on each file's
held-out facts under a key trained on the other file alone (relations and wordings it never saw).

    .venv/bin/python benchmarks/relation_key.py \
        benchmarks/data/counterfact_dev.jsonl:benchmarks/data/counterfact_same_subject.jsonl \
        benchmarks/data/zsre_train_1k.jsonl:benchmarks/data/zsre_same_subject.jsonl \
        --out memserve/data/relation_key_SmolLM2-135M-Instruct.safetensors --json benchmarks/results/relation_key.json

Only the tokenizer and the input embeddings are used: it runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memserve.facts import read_facts
from memserve.hf import EditedModel
from memserve.machine import describe
from memserve.methods import memory_class
from memserve.models import down_proj, load_model
from memserve.relation import RelationKey, fit_relation_key
from memserve.subjects import AnchorIndex
from memserve.training import edit_anchors


def line_of(where: str) -> int:
    return int(where.rsplit(":", 1)[1])


def dataset(edited: EditedModel, facts_path: Path, probes_path: Path) -> dict:
    """Mean input embeddings of each fact's prompt, rephrase (last sentence) and same-subject
    questions, their tokens outside the fact's subject, written and as chat turns."""
    facts, _ = read_facts(facts_path, skip_invalid=True)
    probes = [json.loads(line) for line in probes_path.read_text().splitlines()]
    asked = {p["edit"] for p in probes}
    facts = [f for f in facts if f.rephrases and f.where in asked]
    place = {f.where: i for i, f in enumerate(facts)}
    probes = [p for p in probes if p["edit"] in place]
    embeddings = edited.model.get_input_embeddings().weight.detach().float()
    chat, names = edited.chat, edited.chat.continues_name
    forms = {"written": lambda text: edited.encode(text.rstrip()), "chat": lambda text: chat.format(text.strip())}
    out = {"lines": torch.tensor([line_of(f.where) for f in facts]),
           "owner": torch.tensor([place[p["edit"]] for p in probes]),
           **{form: {"edits": [], "rephrases": []} for form in forms}}
    subjects = []
    for fact in facts:
        prompts = [encode(fact.prompt) for encode in forms.values()]
        variants, _, _, rests = edit_anchors(edited, fact, prompts)
        subjects.append(AnchorIndex.of_edits([(variants, False, False)]))
        for (form, encode), rest in zip(forms.items(), rests):
            rephrase = encode(fact.rephrases[0])
            span = rephrase[slice(*chat.routing_span(rephrase))]
            out[form]["edits"].append(rest)
            out[form]["rephrases"].append(subjects[-1].mentioned(span[chat.last_sentence_start(span):], names).rest)

    def rest(encode, text: str, owner: int) -> tuple[int, ...]:
        ids = encode(text)
        return subjects[owner].mentioned(ids[slice(*chat.routing_span(ids))], names).rest

    for form, encode in forms.items():
        out[form]["questions"] = [rest(encode, p["prompt"], place[p["edit"]]) for p in probes]
        out[form] = {part: torch.stack([embeddings[list(ids)].mean(0) for ids in rows])
                     for part, rows in out[form].items()}
    return out


def measure(key: RelationKey, data: dict, facts: torch.Tensor) -> dict:
    """On the facts `facts` (bool [E]) and their questions: AUC, rephrases kept, questions let through."""
    result = {"facts": int(facts.sum()), "questions": int(facts[data["owner"]].sum())}
    for form in ("written", "chat"):
        d = data[form]
        e, r, q = key.embed(d["edits"]), key.embed(d["rephrases"]), key.embed(d["questions"])
        own = (e * r).sum(-1)
        other = (e[data["owner"]] * q).sum(-1)[facts[data["owner"]]]
        own = own[facts]
        result[form] = {"auc": round(float((own[:, None] > other[None, :]).float().mean()), 4),
                        "rephrases_kept": round(float((own >= key.threshold).float().mean()), 4),
                        "questions_let_through": round(float((other >= key.threshold).float().mean()), 4)}
    return result


def training_rows(sets: dict[str, dict], train: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The facts `train` picks in every set, written and as chat turns (each form its own pairs), and
    their questions' owners renumbered."""
    edits, rephrases, questions, owners, base = [], [], [], [], 0
    for form in ("written", "chat"):
        for name, d in sets.items():
            keep, asked = train[name], train[name][d["owner"]]
            renumber = torch.cumsum(keep.long(), 0) - 1
            edits.append(d[form]["edits"][keep])
            rephrases.append(d[form]["rephrases"][keep])
            questions.append(d[form]["questions"][asked])
            owners.append(renumber[d["owner"][asked]] + base)
            base += int(keep.sum())
    return torch.cat(edits), torch.cat(rephrases), torch.cat(questions), torch.cat(owners)


def other_source_only(sets: dict[str, dict], train: dict, calibration: dict, held_out: dict) -> dict:
    """Each set's held-out facts under a key trained and calibrated on the other sets alone: how
    the key carries over to relations and wordings it never saw."""
    result = {}
    for name, d in sets.items():
        others = {n: o for n, o in sets.items() if n != name}
        if not others:
            continue
        key = fit_relation_key(*training_rows(others, train), training_rows(others, calibration)[:2])
        result[name] = measure(key, d, held_out[name])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+", help="facts.jsonl:same_subject_probes.jsonl")
    parser.add_argument("--train-lines", type=int, default=400)
    parser.add_argument("--calibration-lines", type=int, default=500)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    started = time.time()
    model, tokenizer = load_model()
    memory_cls = memory_class("memoir")
    config = memory_cls.config_class()
    edited = EditedModel(model, tokenizer, memory_cls(config, down_proj(model, config.layer).weight), config.layer)
    sets = {}
    for pair in args.data:
        facts_path, probes_path = (Path(p) for p in pair.split(":"))
        sets[facts_path.name] = dataset(edited, facts_path, probes_path)
        print(f"{facts_path.name}: {len(sets[facts_path.name]['lines'])} facts", flush=True)

    train = {name: d["lines"] <= args.train_lines for name, d in sets.items()}
    calibration = {name: (d["lines"] > args.train_lines) & (d["lines"] <= args.calibration_lines) for name, d in sets.items()}
    held_out = {name: d["lines"] > args.calibration_lines for name, d in sets.items()}
    key = fit_relation_key(*training_rows(sets, train), training_rows(sets, calibration)[:2])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    key.save(args.out)
    result = {"model": "SmolLM2-135M-Instruct", "statistic": "mean input embedding outside the subject", "train_lines": args.train_lines,
              "calibration_lines": args.calibration_lines, "threshold": key.threshold, "dim": key.weight.shape[1],
              "held_out": {n: measure(key, d, held_out[n]) for n, d in sets.items()},
              "calibration": {n: measure(key, d, calibration[n]) for n, d in sets.items()},
              "train": {n: measure(key, d, train[n]) for n, d in sets.items()},
              "other_source_only": other_source_only(sets, train, calibration, held_out),
              "seconds": round(time.time() - started, 1), "machine": describe()}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
