"""Subject anchors: an edit applies only to questions that mention what it is about.

A prompt-mean key (MEMOIR's TopHash) encodes a question's *shape* more than its subject: "What is the
capital of Canada?" overlaps an edit of "What is the capital of Australia?" more than that edit's own
rephrase does (ZsRE at 998 edits: at the threshold where 1% of unedited questions reach an edit, only
~20% of rephrases reach theirs). The subject, however, is named in nearly every way of asking: 99.3% of
ZsRE rephrases and all CounterFact rephrases contain their fact's subject verbatim, while no ZsRE dev
question contains the subject of a train-stream fact. So each edit keeps its subject's token ids
(its *anchor*), and a question may only reach edits whose anchor occurs in its routing span; the key
then decides among those, against the same threshold.

The subject comes from the fact's `subject` field, or else `infer_subject` takes the longest run of
capitalised or numeric words (names, codes, titles). A fact with neither has no anchor and routes on
its key alone, as before. When the edited prompt is its subject and function words only ("5G is",
"Climate change"), it says nothing about the kind of question beyond the subject, so naming the
subject is enough: such an edit *suffices* and skips the key threshold (long passages that name the
topic keep only ~.42 key overlap with a two-word prompt).

A subject followed by a capitalised word is part of a longer name, which is another thing: "United
Nations General Assembly" does not name "United Nations", nor "Arthur Erickson" "Arthur" (`whole_names`;
CounterFact T = 1000: 4 of the 20 neighbourhood chat prompts reaching an edit did so). Exempt are edits
whose own prompt carries the subject on into a capitalised word ("Lehigh Valley United Sonic" for the
subject "Lehigh Valley United") and those whose prompt is the subject alone (temporal "The Hong" for
"The Hong Kong protests"): there the longer name may be what the edit means.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Iterable, Sequence

# Words that say nothing about what is asked: a prompt made of its subject and these ("5G is",
# "Meghan Markle,") is about the subject as a whole.
_FUNCTION_WORDS = {"is", "are", "was", "were", "be", "the", "a", "an", "of", "s", "has", "had", "have"}

# Lowercase words that may sit inside a name ("Duke of la Torre", "Vincent van Gogh").
_JOINERS = {"of", "de", "la", "le", "van", "von", "der", "den", "du", "da", "di", "del", "the", "and", "&", "y"}
# Capitalised sentence openers that are not names ("In Colombia, ...", "The twin city of ...").
_OPENERS = {"in", "on", "at", "the", "a", "an", "what", "which", "who", "whom", "whose", "where", "when", "why",
            "how", "is", "was", "are", "were", "did", "does", "do", "can", "by", "from", "for", "with", "to", "of",
            "it", "its", "this", "that", "there", "name", "tell", "please", "player"}
_WORD = re.compile(r"[^\s,?!;\"()\[\]]+")
_BREAK = re.compile(r"[,?!;()\[\]\"]")  # punctuation between two words ends a name


def infer_subject(prompt: str) -> str | None:
    """The longest run of capitalised or numeric words in `prompt` (joined by lowercase name joiners),
    without a leading question word or a trailing possessive; None when there is none."""
    words = [(m.start(), m.end()) for m in _WORD.finditer(prompt)]

    def is_name(i: int) -> bool:
        word = prompt[words[i][0] : words[i][1]].strip(".:'’")
        return bool(word) and (word[0].isupper() or any(c.isdigit() for c in word)) and word.lower() not in _OPENERS

    def joined(i: int, j: int) -> bool:  # no punctuation between words i and j, word i ends no sentence
        word = prompt[words[i][0] : words[i][1]]
        sentence_end = word.endswith(".") and len(word) > 2  # "P. Jeevanandham" keeps its initial
        return not sentence_end and not _BREAK.search(prompt[words[i][1] : words[j][0]])

    best: str | None = None
    i = 0
    while i < len(words):
        if not is_name(i):
            i += 1
            continue
        j = i
        while j + 1 < len(words) and joined(j, j + 1):
            if is_name(j + 1):
                j += 1
            elif (prompt[words[j + 1][0] : words[j + 1][1]].lower() in _JOINERS and j + 2 < len(words)
                  and joined(j + 1, j + 2) and is_name(j + 2)):
                j += 2
            else:
                break
        text = re.sub(r"(['’]s?)$", "", prompt[words[i][0] : words[j][1]].rstrip(".:"))
        if text and (best is None or len(text) > len(best)):
            best = text
        i = j + 1
    return best


def subject_suffices(prompt: str, subject: str) -> bool:
    """True when `prompt` is `subject` plus function words only: any question naming it is about it."""
    rest = prompt.replace(subject, " ", 1) if subject in prompt else prompt
    return subject in prompt and all(word.lower() in _FUNCTION_WORDS for word in re.findall(r"\w+", rest))


_NEXT_WORD = re.compile(r"\s+(\S)")


def name_continues(prompt: str, subject: str | None) -> bool:
    """True when every time `prompt` says `subject` a capitalised word follows: the subject field is
    then the start of a longer name the prompt uses."""
    ends = [m.end() for m in re.finditer(re.escape(subject), prompt)] if subject else []
    return bool(ends) and all((m := _NEXT_WORD.match(prompt, end)) and m.group(1).isupper() for end in ends)


# Words a subject may start with before the name it is asked by ("The Icelandic Dream", "Dr. Anthony").
_PREFIXES = re.compile(r"^(the|a|an|dr\.|mr\.|mrs\.|ms\.|prof\.)\s+", re.IGNORECASE)


def is_short_name(subject: str, name: str) -> bool:
    """True when `name` is a shorter way to say `subject`: how it begins after an article or title
    ("5G" for "5G is", "Oslo Airport" for "Oslo Airport, Gardermoen", "Icelandic Dream" for "The
    Icelandic Dream") and not a 1-2 letter word. A name from its middle or end ("5" in "iPhone 5",
    "Louis" in "St. Louis", "La" in "La dama boba") names other things too: CounterFact T = 1000, such
    fragments took 6 of the 25 neighbourhood prompts that reached an edit ("Renault 5, developed by"
    -> the iPhone 5 edit), and no ZsRE or CounterFact rephrase needs one."""
    return (name != subject and _PREFIXES.sub("", subject).startswith(name)
            and (len(name) >= 3 or any(c.isdigit() for c in name)))


def anchor_tokens(tokenizer, subject: str, prompt: str) -> list[list[int]]:
    """The token ids `subject` appears as: at the start of a text, after a space (BPE tokenises
    " Canada" and "Canada" differently) and, when it tokenises differently inside `prompt` (e.g.
    glued to punctuation), the prompt's tokens that cover it."""
    variants = []
    for text in (subject, " " + subject):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and ids not in variants:
            variants.append(ids)
    start = prompt.find(subject)
    if start >= 0:
        encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        end = start + len(subject)
        covering = [t for t, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"]) if a < end and b > start]
        if covering and covering not in variants:
            variants.append(covering)
    return variants


class AnchorIndex:
    """Anchors of a memory's edits, found in a token sequence by their first token."""

    def __init__(self):
        self._by_first: dict[int, list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
        self.anchored: set[int] = set()
        self.sufficient: set[int] = set()  # edits whose prompt is (mostly) its subject: naming it is enough
        self.open_names: set[int] = set()  # edits whose own prompt carries the subject on (`name_continues`)

    @classmethod
    def of_edits(cls, anchors: Iterable[tuple[Iterable[Sequence[int]], bool, bool]]) -> "AnchorIndex":
        """The index of edits 0, 1, ... given each one's (anchor variants, naming them suffices, its
        prompt carries the name on)."""
        index = cls()
        for edit, (variants, sufficient, open_name) in enumerate(anchors):
            index.add(edit, variants, sufficient, open_name)
        return index

    def add(self, edit: int, variants: Iterable[Sequence[int]], sufficient: bool = False,
            open_name: bool = False) -> None:
        for ids in variants:
            if ids:
                self._by_first[int(ids[0])].append((edit, tuple(int(t) for t in ids)))
                self.anchored.add(edit)
        if sufficient and edit in self.anchored:
            self.sufficient.add(edit)
        if open_name and edit in self.anchored:
            self.open_names.add(edit)

    def mentioned(self, tokens: Sequence[int], continues_name: Callable[[int], bool] | None = None) -> "Mentions":
        """Edits one of whose anchors occurs (contiguously) in `tokens`, with where each first does.
        With `continues_name` (a token id opens a capitalised word), an occurrence followed by such a
        token is part of a longer name and does not count, except for sufficient and open-name edits."""
        tokens = [int(t) for t in tokens]
        first: dict[int, int] = {}
        named = [False] * len(tokens)
        for start, token in enumerate(tokens):
            for edit, ids in self._by_first.get(token, ()):
                end = start + len(ids)
                if tuple(tokens[start:end]) != ids:
                    continue
                if (continues_name is not None and end < len(tokens) and continues_name(tokens[end])
                        and edit not in self.sufficient and edit not in self.open_names):
                    continue
                first.setdefault(edit, start)
                named[start:end] = [True] * len(ids)
        return Mentions(first, tuple(t for t, inside in zip(tokens, named) if not inside))


class Mentions(frozenset):
    """The edits a token span names (a frozenset of edit indices), the token offset where the span
    first names each (`first`) and the span's token ids outside every name it counts (`rest`: what
    it asks about them, `memserve.relation`)."""

    first: dict[int, int]
    rest: tuple[int, ...]

    def __new__(cls, first: dict[int, int], rest: Sequence[int] = ()):
        mentions = super().__new__(cls, first)
        mentions.first, mentions.rest = dict(first), tuple(rest)
        return mentions

    def __reduce__(self):
        return Mentions, (self.first, self.rest)

    def named_first(self, edits: Iterable[int]) -> set[int]:
        """Those of `edits` the span names earliest (all that start at that offset)."""
        offsets = {edit: self.first[edit] for edit in edits if edit in self.first}
        earliest = min(offsets.values(), default=None)
        return {edit for edit, offset in offsets.items() if offset == earliest}
