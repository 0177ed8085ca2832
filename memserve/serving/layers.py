"""The edited down-projection inside vLLM: `RowParallelLinearWithMemory` and the custom ops it calls.

The wrapper keeps vLLM's `RowParallelLinear` as `base_layer` (as vLLM's own `...WithLoRA` layers do)
and adds the memory's contribution on routed tokens. In compiled mode it goes through two custom ops,
opaque to torch.compile, so routing stays dynamic after the one-time trace:
- `memserve::memory_route` (`ROUTE_OP`): the host half (`MemoryRuntime.route_step`): routing-span
  statistics, routing of prompts that end in this step, the step's per-token routes. It is listed in
  vLLM's `splitting_ops` (`split_graphs_at_routing`), so piecewise CUDA graphs never capture it; on
  steps that only decode it does nothing on the device;
- `memserve::memory_apply`: the device half (`MemoryRuntime.add_delta`), which on the dense path only
  reads persistent per-token buffers: a captured graph can replay it.
Eager calls the runtime directly.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import nn

from .runtime import MemoryRuntime

ROUTE_OP = "memserve::memory_route"

# The runtime of the model whose forward runs in this thread (set by the runner hook for the duration
# of the forward, `running`): what the custom op applies. Nothing process-specific (such as an object
# id) may be an argument of the op: dynamo bakes Python values into the traced graph as constants, and
# the graph is cached on disk (inductor FX cache, vLLM's AOT artifacts) and reused by later processes.
_current = threading.local()


@torch.library.custom_op(ROUTE_OP, mutates_args=())
def memory_route(a: torch.Tensor) -> torch.Tensor:
    """Runs the host half of the step; returns an empty tensor `memory_apply` takes, which orders the
    two ops in the traced graph."""
    runtime = current_runtime()
    if runtime is not None:  # None: a forward outside the runner hook
        runtime.route_step(a)
    return a.new_empty(0)


@memory_route.register_fake
def _memory_route_fake(a: torch.Tensor) -> torch.Tensor:
    return a.new_empty(0)


@torch.library.custom_op("memserve::memory_apply", mutates_args=())
def memory_apply(out: torch.Tensor, a: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    runtime = current_runtime()
    result = out if runtime is None else runtime.add_delta(out, a)
    return result.clone() if result is out else result


@memory_apply.register_fake
def _memory_apply_fake(out: torch.Tensor, a: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(out)


def split_graphs_at_routing(compilation_config) -> bool:
    """Add `ROUTE_OP` to vLLM's `splitting_ops` where vLLM builds piecewise graphs from them (mode
    VLLM_COMPILE with a non-empty list: the GPU default). There host routing runs between captured
    pieces, never inside one. Full-graph captures only replay steps that just decode, on which the
    op does no device work. Returns whether the list was changed. (The CPU backend traces once and
    captures nothing: nothing to split.)"""
    from vllm.config import CompilationMode

    ops = compilation_config.splitting_ops
    if compilation_config.mode != CompilationMode.VLLM_COMPILE or not ops or ROUTE_OP in ops:
        return False
    ops.append(ROUTE_OP)
    return True


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
    the base layer (a submodule) must be the only one it processes.

    The forward is `RowParallelLinear.forward` with the delta added to this rank's partial output
    before the all-reduce (as vLLM's `RowParallelLinearWithLoRA`): under tensor parallelism each rank
    adds the part of the delta its own input features give (`EditMemory.shard_features`)."""

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
        base = self.base_layer
        if not base.input_is_parallel:
            from vllm.distributed.utils import split_tensor_along_last_dim

            x = split_tensor_along_last_dim(x, num_partitions=base.tp_size)[base.tp_rank].contiguous()
        bias = None if (base.tp_rank > 0 or base.skip_bias_add) else base.bias
        out = base.quant_method.apply(base, x, bias)
        if torch.compiler.is_compiling():
            routed = torch.ops.memserve.memory_route(x)  # the runtime is looked up at run time
            out = torch.ops.memserve.memory_apply(out, x, routed)
        else:
            out = self.runtime.apply(out, x)
        if base.reduce_results and base.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            out = tensor_model_parallel_all_reduce(out)
        output_bias = base.bias if base.skip_bias_add else None
        return (out, output_bias) if base.return_bias else out
