"""Method registry: a method name maps to its memory class (which names its config class)."""

from .base import NO_ROUTE, EditExamples, EditMemory, EditSession, MethodConfig, mean_prompt_stats, route_explanation
from .memoir import MemoirConfig, MemoirMemory
from .wise import WiseConfig, WiseMemory

METHODS: dict[str, type[EditMemory]] = {cls.method: cls for cls in (MemoirMemory, WiseMemory)}


def memory_class(method: str) -> type[EditMemory]:
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}") from None


__all__ = [
    "METHODS", "NO_ROUTE", "EditExamples", "EditMemory", "EditSession", "MethodConfig", "MemoirConfig",
    "MemoirMemory", "WiseConfig", "WiseMemory", "mean_prompt_stats", "memory_class", "route_explanation",
]
