"""Facts files (JSON Lines or a JSON array): the canonical schema plus ZsRE and WISE/EasyEdit field names.

Canonical: {"prompt": str, "target": str, "rephrases": [str], "locality": [{"prompt": str, "answer": str}],
            "subject": str (optional: what the fact is about, as written in the prompt; see memserve.subjects)}
ZsRE:      src -> prompt, alt -> target, rephrase -> rephrases, loc/loc_ans -> locality
WISE:      prompt, target_new -> target, rephrase_prompt | ood_rephrase -> rephrases,
           locality_prompt/locality_ground_truth -> locality
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path


class FactsError(ValueError):
    """A bad row: the message names the file, the line and the field."""


@dataclass(frozen=True)
class Fact:
    prompt: str
    target: str
    rephrases: tuple[str, ...] = ()
    locality: tuple[tuple[str, str], ...] = ()
    subject: str | None = None
    line: int = 0
    source: str = ""

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def key(self) -> str:
        """Identity of an edit: the same prompt and target is the same edit (resumable `edit`)."""
        payload = json.dumps([self.prompt, self.target], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    @property
    def prompt_key(self) -> str:
        """Identity of the question: a later edit with the same prompt and a new target supersedes
        the earlier one (it wins routing ties, and the store records which edit it replaced)."""
        return hashlib.sha256(self.prompt.encode()).hexdigest()[:32]

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "target": self.target,
            "rephrases": list(self.rephrases),
            "locality": [{"prompt": p, "answer": a} for p, a in self.locality],
            **({"subject": self.subject} if self.subject else {}),
        }


_ALIASES = {
    "prompt": ("prompt", "src"),
    "target": ("target", "alt", "target_new"),
    "rephrases": ("rephrases", "rephrase", "rephrase_prompt", "ood_rephrase"),
}


def _pick(row: dict, name: str):
    for key in _ALIASES[name]:
        if key in row:
            return key, row[key]
    return _ALIASES[name][0], None


def _text(where: str, key: str, value, required: bool) -> str | None:
    if value is None:
        if required:
            raise FactsError(f"{where}: missing field '{key}'")
        return None
    if not isinstance(value, str):
        raise FactsError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise FactsError(f"{where}: field '{key}' is empty")
    return value.strip()


def _texts(where: str, key: str, value) -> tuple[str, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise FactsError(f"{where}: field '{key}' must be a string or a list of strings")
    return tuple(v.strip() for v in values if v.strip())


def _locality(where: str, row: dict) -> tuple[tuple[str, str], ...]:
    if "locality" in row:
        items = row["locality"]
        if not isinstance(items, list):
            raise FactsError(f"{where}: field 'locality' must be a list of {{prompt, answer}} objects")
        pairs = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise FactsError(f"{where}: field 'locality[{i}]' must be an object with prompt and answer")
            prompt = _text(where, f"locality[{i}].prompt", item.get("prompt"), True)
            answer = _text(where, f"locality[{i}].answer", item.get("answer"), True)
            pairs.append((prompt, answer))
        return tuple(pairs)
    for p_key, a_key in (("loc", "loc_ans"), ("locality_prompt", "locality_ground_truth")):
        if p_key in row or a_key in row:
            prompt = _text(where, p_key, row.get(p_key), True)
            answer = row.get(a_key)
            if isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer):
                answer = answer[0]
            answer = _text(where, a_key, answer, True)
            return ((prompt, answer),)
    return ()


def parse_row(row, where: str, line: int = 0, source: str = "") -> Fact:
    if not isinstance(row, dict):
        raise FactsError(f"{where}: expected a JSON object, got {type(row).__name__}")
    p_key, prompt = _pick(row, "prompt")
    t_key, target = _pick(row, "target")
    r_key, rephrases = _pick(row, "rephrases")
    prompt = _text(where, p_key, prompt, True)
    subject = _text(where, "subject", row.get("subject"), False) or None
    if subject is not None and subject not in prompt:
        raise FactsError(f"{where}: field 'subject': {subject!r} does not occur in the prompt (an edit applies to "
                         "questions that mention its subject, as written in its prompt)")
    return Fact(
        prompt=prompt,
        target=_text(where, t_key, target, True),
        rephrases=_texts(where, r_key, rephrases),
        locality=_locality(where, row),
        subject=subject,
        line=line,
        source=source,
    )


def read_facts(path: str | Path, skip_invalid: bool = False) -> tuple[list[Fact], list[str]]:
    """All facts of a file, or a FactsError at the first bad row (with `skip_invalid`: the bad rows'
    messages are returned instead). The file is JSON Lines (blank lines ignored) or one JSON array of
    row objects (as EasyEdit, WISE and CounterFact ship their data); `-` reads standard input."""
    path = Path(path)
    name = "<stdin>" if str(path) == "-" else str(path)
    try:
        raw = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise FactsError(f"{name}: cannot read: {exc.strerror or exc}") from None
    facts, problems = [], []
    for number, where, parse in _rows(raw, name):
        try:
            facts.append(parse_row(parse(), where, number, name))
        except FactsError as exc:
            if not skip_invalid:
                raise
            problems.append(str(exc))
    if not facts and not problems:
        raise FactsError(f"{name}: no facts in file")
    return facts, problems


def _rows(raw: bytes, name: str):
    """(line number, where, parse() -> the row's JSON value) for every row of a facts file. A file
    named *.jsonl is always JSON Lines; any other starting with '[' is one JSON array."""
    if not name.endswith(".jsonl") and raw.lstrip().startswith(b"["):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise FactsError(f"{name}:{line}: not valid UTF-8 (byte {exc.start})") from None
        yield from _array_rows(text, name)
        return
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if line.strip():
            where = f"{name}:{number}"
            yield number, where, lambda line=line, where=where: _loads(line, where)


def _loads(line: bytes, where: str):
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FactsError(f"{where}: not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FactsError(f"{where}: malformed JSON: {exc.msg} (column {exc.colno})") from None


def _array_rows(text: str, name: str):
    """Rows of a JSON array, each named by the line it starts on and its position in the array."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    item = 0

    def fail(message: str, at: int):
        line = text.count("\n", 0, at) + 1
        raise FactsError(f"{name}:{line}: malformed JSON array: {message}")

    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == "]" and item == 0:
            pos += 1
            break
        item += 1
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise FactsError(f"{name}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        yield line, f"{name}:{line} (item {item})", lambda value=value: value
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            pos += 1
            break
        fail("expected ',' or ']' after item %d" % item, pos)
    if text[pos:].strip():
        fail("text after the closing ']'", pos)
