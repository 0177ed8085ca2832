"""Where the question is in a chat-formatted prompt.

Routing averages the memory's statistic over a prompt's *routing span*. For a plain prompt that is the
whole prompt. A chat template wraps the user's words in a system prompt and role markers (SmolLM2:
~30 template tokens around a ~10-token question), which would dominate the average; so for a prompt
that ends like the template's generation prompt, the routing span is the last user message only.
Every edit also gets a key from its chat-formatted prompt (see `training.edit_batch`), so a chat
question and its edit are compared in the same context.

The rule works on token ids, so the transformers reference, the trainer and the vLLM runner apply it
identically to whatever prompt they see. A chat request with a custom system prompt is still routed
on its last user message; other roles and earlier turns never count.

A routing span of several sentences also has a *last sentence* (`ChatFormat.last_sentence_start`):
"Danielle Darrieux grew up in Paris. The mother tongue of Danielle Darrieux is" asks its question in
the last one, and an opening sentence about something else moves the span's mean away from the
edit's key; MEMOIR routes such a request again on its last sentence when the whole span reaches no
edit (`methods.memoir`).
"""

from __future__ import annotations

import re
from typing import Sequence

SENTINEL = "memserve-question-sentinel"
SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s*$")  # a token text that can end a sentence


class ChatFormat:
    """The token markers around the last user message of a tokenizer's chat template."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.header: list[int] = []  # tokens that open a user turn (e.g. <|im_start|> user \n)
        self.suffix: list[int] = []  # tokens from the end of the user message to the answer
        self._texts: dict[int, tuple[bool, bool, bool, bool]] = {}  # token id -> `_token_text`
        if getattr(tokenizer, "chat_template", None) is None:
            return
        text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], add_generation_prompt=True, tokenize=False)
        if text.count(SENTINEL) != 1:
            return
        before, after = text.split(SENTINEL)
        before_ids = tokenizer.encode(before, add_special_tokens=False)
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        opens = [i for i, token in enumerate(before_ids) if token in special]
        if opens:
            self.header = before_ids[opens[-1] :]
            self.suffix = tokenizer.encode(after, add_special_tokens=False)

    @property
    def available(self) -> bool:
        return bool(self.header and self.suffix)

    def format(self, question: str) -> list[int]:
        """Token ids of `question` as a single user turn, ready for the answer."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
        )

    def routing_span(self, prompt: list[int]) -> tuple[int, int]:
        """[start, end) of the tokens a prompt is routed on: the last user message of a chat-formatted
        prompt, otherwise the whole prompt."""
        n, h, s = len(prompt), len(self.header), len(self.suffix)
        if not self.available or n <= h + s or list(prompt[n - s :]) != self.suffix:
            return 0, n
        for start in range(n - s - h, -1, -1):
            if list(prompt[start : start + h]) == self.header:
                return (start + h, n - s) if start + h < n - s else (0, n)
        return 0, n

    def last_sentence_start(self, tokens: Sequence[int]) -> int:
        """Offset in a routing span's `tokens` where its last sentence starts: after the last token
        that ends a sentence ("." "?" "!", maybe closing quotes) and is followed by a space and
        more of the span; 0 for a span of one sentence. A rule on token ids, like `routing_span`."""
        for j in range(len(tokens) - 1, 0, -1):
            ends, _, space_after, _ = self._token_text(tokens[j - 1])
            if ends and (space_after or self._token_text(tokens[j])[1]):
                return j
        return 0

    def continues_name(self, token: int) -> bool:
        """Whether a token opens a capitalised word: after a subject it makes the subject part of a
        longer name ("United Nations" + " General"; `subjects.AnchorIndex.mentioned`)."""
        return self._token_text(token)[3]

    def _token_text(self, token: int) -> tuple[bool, bool, bool, bool]:
        """Whether a token's text can end a sentence, starts with whitespace, ends with whitespace,
        opens a capitalised word (cached per id; a single-token decode drops a SentencePiece word's
        leading space, so the token's own piece says whether it opens a word)."""
        known = self._texts.get(token)
        if known is None:
            text = self.tokenizer.decode([token])
            piece = self.tokenizer.convert_ids_to_tokens(token) or ""
            opens_word = text[:1].isspace() or piece[:1] in ("\u2581", "\u0120", "\u010a")
            known = self._texts[token] = (bool(SENTENCE_END.search(text)), opens_word, text[-1:].isspace(),
                                          opens_word and text.lstrip()[:1].isupper())
        return known
