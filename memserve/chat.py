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
"""

from __future__ import annotations

SENTINEL = "memserve-question-sentinel"


class ChatFormat:
    """The token markers around the last user message of a tokenizer's chat template."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.header: list[int] = []  # tokens that open a user turn (e.g. <|im_start|> user \n)
        self.suffix: list[int] = []  # tokens from the end of the user message to the answer
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
