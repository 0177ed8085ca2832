"""memserve's per-request options, parsed once into a typed object (no vLLM imports here).

Clients pass them in `vllm_xargs` (OpenAI requests) or `SamplingParams.extra_args` (offline):
- `memserve_route: k` forces memory slot k, or -1 for the base model;
- `memserve_prompt_len: n` routes on the first n prompt tokens, the memory acting from token n-1 on
  (teacher forcing of prompt + target in one request).

The same rules run twice: at the API boundary (`server.py`: HTTP 400 naming the field) and in the
engine when a request is first seen (`RequestOptions.parse`: an invalid option is logged and the
request is served without edits). Nothing a client sends may raise inside the model's forward, where
vLLM treats an exception as fatal to the engine and so to every other client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

ROUTE_ARG = "memserve_route"
PROMPT_LEN_ARG = "memserve_prompt_len"
# Set by the server on every routed HTTP request (never by clients): the key its route report is
# looked up by, unique per HTTP request even when clients reuse request ids.
REPORT_TAG_ARG = "memserve_report"
# Set by the server's `POST /v1/memserve/route` (never by clients): keep the explanation of the
# request's route (`methods.route_explanation`) with its top-N nearest slots.
EXPLAIN_ARG = "memserve_explain"
INTERNAL = (REPORT_TAG_ARG, EXPLAIN_ARG)
OPTIONS = (ROUTE_ARG, PROMPT_LEN_ARG)
NOT_FORCED = -2
MAX_PROMPT_LEN = 1 << 31  # anything longer is clipped to the prompt anyway
MAX_EXPLAIN = 100  # nearest slots an explanation may list


class OptionError(ValueError):
    """An invalid memserve option: the message names the field."""


def _integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"vllm_xargs.{name} must be an integer, got {type(value).__name__} {value!r:.40}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise OptionError(f"vllm_xargs.{name} must be {bound}, got {value}")
    return value


def check_options(extra: Mapping[str, Any] | None, slots: int | None = None, internal: bool = False) -> None:
    """Raise `OptionError` for the first invalid memserve option in `extra`. With `slots` (routable
    memory slots of the served store) a forced route must also name one of them."""
    if not extra:
        return
    for name in extra:
        if isinstance(name, str) and name.startswith("memserve_") and name not in OPTIONS:
            if name in INTERNAL and internal:
                continue
            raise OptionError(f"vllm_xargs.{name} is not a memserve option (known: {', '.join(OPTIONS)})")
    if ROUTE_ARG in extra:
        high = None if slots is None else slots - 1
        _integer(ROUTE_ARG, extra[ROUTE_ARG], -1, high)
    if PROMPT_LEN_ARG in extra:
        _integer(PROMPT_LEN_ARG, extra[PROMPT_LEN_ARG], 1, MAX_PROMPT_LEN)
    if internal and EXPLAIN_ARG in extra:
        _integer(EXPLAIN_ARG, extra[EXPLAIN_ARG], 1, MAX_EXPLAIN)


@dataclass(frozen=True)
class RequestOptions:
    """What one request asked of the memory; `problem` says why its options were refused (it is then
    served without edits)."""

    route: int = NOT_FORCED
    prompt_len: int | None = None
    report_tag: str | None = None
    explain: int | None = None  # keep the route's explanation with this many nearest slots
    problem: str | None = None

    @classmethod
    def parse(cls, extra: Mapping[str, Any] | None, slots: int | None) -> "RequestOptions":
        """Never raises: whatever the request carries, the result is a valid option set (`slots`: as
        in `check_options`)."""
        try:
            if extra is not None and not isinstance(extra, Mapping):
                raise OptionError(f"extra_args must be a mapping, got {type(extra).__name__}")
            extra = extra or {}
            check_options(extra, slots, internal=True)
            tag = extra.get(REPORT_TAG_ARG)
            return cls(
                route=extra.get(ROUTE_ARG, NOT_FORCED),
                prompt_len=extra.get(PROMPT_LEN_ARG),
                report_tag=tag if isinstance(tag, str) else None,
                explain=extra.get(EXPLAIN_ARG),
            )
        except Exception as exc:  # noqa: BLE001 - a client's input must never stop the engine
            return cls(route=-1, problem=str(exc) or type(exc).__name__)

    @property
    def forced(self) -> bool:
        return self.route != NOT_FORCED

    def routing_prompt_len(self, num_prompt_tokens: int) -> int:
        """How many of the prompt's tokens the request is routed on."""
        return num_prompt_tokens if self.prompt_len is None else min(self.prompt_len, num_prompt_tokens)
