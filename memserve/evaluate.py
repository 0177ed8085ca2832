"""The papers' metrics, on the final model after all edits.

- Rel: teacher-forced token accuracy of `prompt + " " + target` (argmax at each target position).
- Gen: the same on each rephrase (mean over a fact's rephrases).
- Loc: on each locality prompt + answer, share of answer positions whose argmax is unchanged from the
  unedited model.
- PPL: perplexity of the target (hallucination set), reported beside Rel.
- Gen-acc (extra): the greedy answer to the bare prompt contains the target.
- Chat: all of the above again with every probe asked as a chat user turn (the served chat endpoint).
- Routing: how often an edit prompt / rephrase reaches its own edit (WISE: any memory) and a
  locality prompt reaches none.
- Unedited (specificity): questions nobody edited, often of the same shape as the edits: the share
  that reach any edit and the share of answer tokens unchanged from the unedited model.

A backend scores token sequences; `HFBackend` is the transformers reference. The vLLM backend
(`memserve.serving.vllm_backend`) has the same two methods.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .facts import Fact
from .hf import EditedModel
from .training import chat_prompt_and_answer, prompt_and_answer


@dataclass
class Scored:
    predicted: list[int]  # argmax at positions plen-1 .. len-2 (they predict tokens plen .. len-1)
    logprobs: list[float]  # log-probability of each actual answer token
    route: int | None  # None: the backend could not tell (counted as a miss, and under "unknown_routes")


class Backend(Protocol):
    name: str

    def score(self, sequences: list[list[int]], prompt_lens: list[int], use_memory: bool = True) -> list[Scored]: ...

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[int]]: ...


class HFBackend:
    name = "hf"

    def __init__(self, edited: EditedModel, batch_size: int = 32):
        self.edited, self.batch_size = edited, batch_size

    def score(self, sequences, prompt_lens, use_memory=True):
        out: list[Scored] = []
        for start in range(0, len(sequences), self.batch_size):
            seqs, plens = sequences[start : start + self.batch_size], prompt_lens[start : start + self.batch_size]
            logits, routes = self.edited.logits(seqs, plens, use_memory=use_memory)
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for row, (seq, plen) in enumerate(zip(seqs, plens)):
                positions = torch.arange(plen - 1, len(seq) - 1)
                answer = torch.tensor(seq[plen:])
                out.append(Scored(
                    predicted=logits[row, positions].argmax(-1).tolist(),
                    logprobs=logprobs[row, positions, answer].tolist(),
                    route=int(routes[row]) if routes is not None else -1,
                ))
        return out

    def generate(self, prompts, max_new_tokens):
        outs, routes = [], []
        for start in range(0, len(prompts), self.batch_size):
            o, r = self.edited.generate(prompts[start : start + self.batch_size], max_new_tokens)
            outs += o
            routes += r.tolist()
        return outs, routes


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate(
    edited: EditedModel, backend: Backend, facts: list[Fact], edit_ids: list[int | None], generation: bool = True,
    chat: bool = True, unedited: list[Fact] = (), progress: Callable[[str], None] | None = None,
) -> dict:
    """Metrics for `facts` on the backend's current model. `edit_ids[i]` is the stored edit of fact i.
    With `chat` (and a tokenizer with a chat template) the same metrics on every probe asked as a chat
    user turn (answer = the assistant reply) are added under "chat". `unedited`: questions that were
    never edited (`unedited_metrics`), reported under "unedited" in both forms."""
    forms = {"written": (lambda p, a: prompt_and_answer(edited, p, a), edited.encode)}
    if chat and edited.chat.available:
        forms["chat"] = (lambda p, a: chat_prompt_and_answer(edited, p, a), edited.chat.format)
    result: dict = {}
    for form, (encode, encode_prompt) in forms.items():
        if progress:
            progress(f"{len(facts)} facts asked {'as written' if form == 'written' else 'as chat turns'}: "
                     f"Rel, Gen, Loc{', generation' if generation else ''}")
        metrics = _metrics(edited, backend, facts, edit_ids, generation, encode, encode_prompt)
        if unedited:
            if progress:
                progress(f"{len(unedited)} never-edited questions ({form})")
            metrics["unedited"] = unedited_metrics(backend, unedited, encode)
        if form == "written":
            result.update(metrics)
        else:
            result[form] = metrics
    result["backend"] = getattr(backend, "name", "vllm")
    return result


def unedited_metrics(backend: Backend, probes: list[Fact], encode) -> dict:
    """Specificity on questions nobody edited (e.g. same-template questions about other subjects):
    the share that reach any edit, and the share of answer tokens whose argmax is unchanged from the
    unedited model (teacher-forced on `prompt + target`, as Loc)."""
    sequences, prompt_lens = zip(*(encode(p.prompt, p.target) for p in probes))
    edited_scores = backend.score(list(sequences), list(prompt_lens), use_memory=True)
    base_scores = backend.score(list(sequences), list(prompt_lens), use_memory=False)
    unchanged = [sum(e == b for e, b in zip(es.predicted, bs.predicted)) / len(bs.predicted)
                 for es, bs in zip(edited_scores, base_scores) if bs.predicted]
    return {
        "n": len(probes),
        "reach_an_edit": _mean([s.route is not None and s.route >= 0 for s in edited_scores]),
        "answers_unchanged": _mean(unchanged),
        "unknown_routes": sum(s.route is None for s in edited_scores),
    }


def _metrics(edited, backend, facts, edit_ids, generation, encode, encode_prompt) -> dict:
    """Rel/Gen/Loc/PPL, routing hits and generation accuracy with probes tokenised by `encode`."""
    probes: list[tuple[str, int]] = []  # (kind, fact index)
    sequences, prompt_lens, texts = [], [], []

    def add(kind: str, index: int, prompt: str, answer: str) -> None:
        seq, plen = encode(prompt, answer)
        probes.append((kind, index))
        texts.append(prompt)
        sequences.append(seq)
        prompt_lens.append(plen)

    for i, fact in enumerate(facts):
        add("rel", i, fact.prompt, fact.target)
        for rephrase in fact.rephrases:
            add("gen", i, rephrase, fact.target)
        for prompt, answer in fact.locality:
            add("loc", i, prompt, answer)

    edited_scores = backend.score(sequences, prompt_lens, use_memory=True)
    loc_rows = [j for j, (kind, _) in enumerate(probes) if kind == "loc"]
    base_scores = backend.score([sequences[j] for j in loc_rows], [prompt_lens[j] for j in loc_rows], use_memory=False)
    base_of = dict(zip(loc_rows, base_scores))

    per_fact: dict[str, list[list[float]]] = {"rel": [[] for _ in facts], "gen": [[] for _ in facts], "loc": [[] for _ in facts]}
    nll: list[float] = []
    hits = {"rel": [], "gen": [], "loc": []}
    eos = edited.tokenizer.eos_token_id
    ended_early = []  # per edit prompt: the end-of-sequence token won at one of its answer's tokens
    fact_of_edit = {edit: i for i, edit in enumerate(edit_ids) if edit is not None}
    reaching = []  # the locality probes that reached an edit: which, whose, and what it cost
    for j, ((kind, i), scored) in enumerate(zip(probes, edited_scores)):
        answer = sequences[j][prompt_lens[j] :]
        if kind == "loc":
            reference = base_of[j].predicted
            value = sum(p == r for p, r in zip(scored.predicted, reference)) / len(reference)
            hits["loc"].append(scored.route is not None and scored.route < 0)
            if scored.route is not None and scored.route >= 0:
                owner = fact_of_edit.get(scored.route)
                reaching.append({"fact": facts[i].where, "prompt": texts[j], "edit": scored.route,
                                 "edit_fact": None if owner is None else facts[owner].where, "unchanged": value})
        else:
            value = sum(p == t for p, t in zip(scored.predicted, answer)) / len(answer)
            if edited.memory.routes_are_edits:
                hits[kind].append(edit_ids[i] is not None and scored.route == edit_ids[i])
            else:  # WISE routes to a memory holding many edits: being routed at all is the hit
                hits[kind].append(edit_ids[i] is not None and scored.route is not None and scored.route >= 0)
            if kind == "rel":
                ended_early.append(eos is not None and eos in scored.predicted)
                if scored.logprobs:
                    nll.append((i, -sum(scored.logprobs) / len(scored.logprobs)))
        per_fact[kind][i].append(value)

    worst_ppl = max(nll, key=lambda item: item[1], default=None)
    rel_of = [(i, _mean(v)) for i, v in enumerate(per_fact["rel"]) if v]
    worst_rel = min(rel_of, key=lambda item: item[1], default=None)
    result = {
        "n": len(facts),
        "rel": _mean([_mean(v) for v in per_fact["rel"] if v]),
        "gen": _mean([_mean(v) for v in per_fact["gen"] if v]),
        "loc": _mean([_mean(v) for v in per_fact["loc"] if v]),
        "ppl": _mean([math.exp(x) for _, x in nll]),
        # What most imperfect chat answers were at T = 1000: a premature end of turn (README).
        "rel_ended_early": _mean(ended_early),
        # No hidden failures: the single worst fact next to the means.
        "worst": {
            "ppl": None if worst_ppl is None else {"value": math.exp(worst_ppl[1]), "fact": facts[worst_ppl[0]].where},
            "rel": None if worst_rel is None else {"value": worst_rel[1], "fact": facts[worst_rel[0]].where},
            "facts_rel_below_half": sum(value < 0.5 for _, value in rel_of),
        },
        "routing": {
            "edit_prompt_to_own_edit": _mean(hits["rel"]),
            "rephrase_to_own_edit": _mean(hits["gen"]),
            "locality_to_no_edit": _mean(hits["loc"]),
            "unknown_routes": sum(scored.route is None for scored in edited_scores),
            "locality_reaching_an_edit": reaching,
        },
    }
    if generation:
        prompts = [encode_prompt(f.prompt) for f in facts]
        longest = max(len(edited.encode(" " + f.target)) for f in facts)
        outputs, _ = backend.generate(prompts, longest + 4)
        texts = [edited.tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        result["gen_acc"] = _mean([_normalise(f.target) in _normalise(t) for f, t in zip(facts, texts)])
        # Stricter: the answer is the target and nothing more (the model stopped after it).
        result["gen_exact"] = _mean([_normalise(f.target) == _normalise(t) for f, t in zip(facts, texts)])
    return result


def evaluate_store(store_path, facts: list[Fact], backend: str = "hf", generation: bool = True,
                   unedited: list[Fact] = (), progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate `facts` (and the never-edited questions `unedited`) on the final model of the store at
    `store_path` (opened read-only). `progress(phase)` is told what runs now."""
    from memserve.store import Store

    from .editor import load_memory, store_model_dir
    from .models import down_proj, load_model

    if backend not in ("hf", "vllm"):
        raise ValueError(f"unknown backend {backend!r}; choose hf or vllm")
    with Store.open(store_path, readonly=True) as store:  # closed before a vLLM engine opens it
        manifest, edits = store.manifest, store.num_edits
        model, tokenizer = load_model(store_model_dir(store))
        base = down_proj(model, manifest["layer"]).weight
        edited = EditedModel(model, tokenizer, load_memory(store, base), manifest["layer"])
        edit_ids = [store.find(f.key) for f in facts]
    if backend == "hf":
        runner: Backend = HFBackend(edited)
    else:
        from .serving import vllm_backend

        runner = vllm_backend(str(store_path))
    result = evaluate(edited, runner, facts, edit_ids, generation=generation, unedited=unedited, progress=progress)
    result.update(method=manifest["method"], edits_in_store=edits, backend=backend)
    return result
