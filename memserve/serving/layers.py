"""The edited down-projection inside vLLM: `RowParallelLinearWithMemory` and the custom op it calls.

The wrapper keeps vLLM's `RowParallelLinear` as `base_layer` (as vLLM's own `...WithLoRA` layers do)
and adds the memory's contribution on routed tokens. In compiled mode it goes through the custom op
`memserve::memory_apply`, which is opaque to torch.compile, so routing stays dynamic after the
one-time trace; eager calls the runtime directly.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import nn

from .runtime import MemoryRuntime

# The runtime of the model whose forward runs in this thread (set by the runner hook for the duration
# of the forward, `running`): what the custom op applies. Nothing process-specific (such as an object
# id) may be an argument of the op: dynamo bakes Python values into the traced graph as constants, and
# the graph is cached on disk (inductor FX cache, vLLM's AOT artifacts) and reused by later processes.
_current = threading.local()


@torch.library.custom_op("memserve::memory_apply", mutates_args=())
def memory_apply(out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    runtime = current_runtime()
    result = out if runtime is None else runtime.apply(out, a)  # None: a forward outside the runner hook
    return result.clone() if result is out else result


@memory_apply.register_fake
def _memory_apply_fake(out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(out)


def current_runtime() -> MemoryRuntime | None:
    return getattr(_current, "runtime", None)


@contextlib.contextmanager
def running(runtime: MemoryRuntime) -> Iterator[None]:
    """Make `runtime` the one the custom op applies in this thread while the block runs."""
    outer = current_runtime()
    _current.runtime = runtime
    try:
        yield
    finally:
        _current.runtime = outer


class RowParallelLinearWithMemory(nn.Module):
    """vLLM's down-projection (a `RowParallelLinear`, returning (out, bias)) plus the memory's delta
    on routed tokens. Every public attribute it does not define is the base layer's (weight, bias, tp
    settings), except `quant_method`: the model loader post-processes each module that has one, and
    the base layer (a submodule) must be the only one it processes."""

    requires_unquantized_input = True  # keep vLLM from fusing an activation quant into our input
    LOCAL = ("quant_method",)

    def __init__(self, base_layer: nn.Module, runtime: MemoryRuntime):
        super().__init__()
        self.base_layer = base_layer
        self.runtime = runtime  # not an nn.Module: holds no parameters vLLM would try to load

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in self.LOCAL:
                raise
            return getattr(self._modules["base_layer"], name)

    def forward(self, x):
        out, bias = self.base_layer(x)
        if torch.compiler.is_compiling():
            out = torch.ops.memserve.memory_apply(out, x)  # the runtime is looked up at run time
        else:
            out = self.runtime.apply(out, x)
        return out, bias
