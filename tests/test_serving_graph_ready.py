"""Steps that only decode could be replayed by a captured (CUDA) graph.

On the dense path (`MemoryRuntime(dense=True)`, the default on any device but the CPU) a decode-only
step's routes are written into persistent per-token buffers before the forward (`begin_step`), and
the two ops the wrapper runs then do no host work on activations: no routing, no host
synchronisation (`.tolist()`, `.item()`, `nonzero`, boolean indexing, ...), and the same device ops
with the same shapes whatever the routes. There is no GPU on this box: this is what can be checked on
the CPU, op by op.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memserve.methods.base import NO_ROUTE
from memserve.serving.layers import ROUTE_OP, split_graphs_at_routing
from memserve.serving.runtime import BatchPlan, MemoryRuntime

from .test_serving_runtime import H, I, make_memoir, reference

# aten ops that read device values on the host (or produce data-dependent shapes)
SYNCING = {"nonzero", "_local_scalar_dense", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
           "masked_select", "item", "bincount", "repeat_interleave"}


class OpLog(TorchDispatchMode):
    """Every aten op run inside the block, with the shapes and dtypes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, tuple((tuple(t.shape), t.dtype) for t in tensors)))
        return func(*args, **kwargs)


def host_reads_forbidden(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor on a decode-only step")

    for name in ("tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def decode_plan(order: list[str], positions: dict[str, int], plens: dict[str, int]) -> BatchPlan:
    n = len(order)
    return BatchPlan(order, np.arange(n + 1), np.array([positions[r] for r in order]), np.array([plens[r] for r in order]))


def test_decode_only_steps_do_no_host_work_and_replay_the_same_ops(monkeypatch):
    memory, prompts = make_memoir()
    g = torch.Generator().manual_seed(4)
    seqs = {"r0": torch.cat([prompts[0], torch.randn(3, I, generator=g)]),
            "r1": torch.cat([prompts[2], torch.randn(3, I, generator=g)]),
            "r2": torch.randn(9 + 3, I, generator=g)}
    plens = {"r0": 5, "r1": 11, "r2": 9}
    runtime = MemoryRuntime(memory, dense=True, max_tokens=64)
    order = list(seqs)
    starts = np.cumsum([0] + [plens[r] for r in order])
    runtime.begin_step(BatchPlan(order, starts, np.zeros(3, np.int64), np.array([plens[r] for r in order])))
    assert runtime.needs_routing()
    runtime.apply(torch.zeros(int(starts[-1]), H), torch.cat([seqs[r][: plens[r]] for r in order]))
    runtime.end_step()
    assert [runtime.route_info(r).route for r in order] == [0, 2, -1]
    buffers = runtime._buffers[0].routes.data_ptr(), runtime._buffers[0].slots.data_ptr()

    wants = {rid: reference(memory, seqs[rid], plens[rid])[0] for rid in seqs}
    calls = {"route": 0, "token_stats": 0}
    for name in calls:
        original = getattr(memory, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(memory, name, counted)

    logs, positions = [], dict(plens)
    for step, step_order in enumerate([["r0", "r1", "r2"], ["r2", "r0", "r1"], ["r1", "r2", "r0"]]):
        runtime.begin_step(decode_plan(step_order, positions, plens))  # host, before the forward
        assert not runtime.needs_routing()
        a = torch.stack([seqs[r][positions[r]] for r in step_order])
        log = OpLog()
        with monkeypatch.context() as patched:
            host_reads_forbidden(patched)
            with log:
                runtime.route_step(a)
                route_ops = len(log.ops)
                out = runtime.add_delta(torch.zeros(3, H), a)
        runtime.end_step()
        assert route_ops == 0, log.ops[:route_ops]  # the routing op does nothing on the device
        assert not [op for op, _ in log.ops if op in SYNCING]
        assert not [op for op, args in log.ops if op == "index" and any(dtype == torch.bool for _, dtype in args)]
        logs.append(log.ops)
        for k, rid in enumerate(step_order):
            torch.testing.assert_close(out[k], wants[rid][positions[rid]], msg=f"step {step} {rid}")
            positions[rid] += 1
    assert calls == {"route": 0, "token_stats": 0}
    assert logs[0] == logs[1] == logs[2]  # routes moved between rows: same ops, same shapes
    assert (runtime._buffers[0].routes.data_ptr(), runtime._buffers[0].slots.data_ptr()) == buffers  # in place
    assert runtime.routing_steps == 1 and runtime.steps == 4


def test_wise_decode_only_steps_do_no_host_work_and_match_the_compact_path(monkeypatch):
    """WISE's dense delta (every memory's product, masked by route) needs no host read of the routes
    and gives what the host-grouped compact path gives, for routed and unrouted rows alike."""
    import copy

    memory, prompts = wise_memory()
    g = torch.Generator().manual_seed(8)
    seqs = {"r0": torch.cat([prompts[0], torch.randn(3, I, generator=g)]),
            "r1": torch.cat([prompts[1], torch.randn(3, I, generator=g)])}
    plens = {rid: seq.shape[0] - 3 for rid, seq in seqs.items()}
    order = list(seqs)
    starts = np.cumsum([0] + [plens[r] for r in order])
    runtimes = {"compact": MemoryRuntime(copy.deepcopy(memory), dense=False),
                "dense": MemoryRuntime(memory, dense=True, max_tokens=64)}
    for runtime in runtimes.values():
        runtime.begin_step(BatchPlan(order, starts, np.zeros(2, np.int64), np.array([plens[r] for r in order])))
        runtime.apply(torch.zeros(int(starts[-1]), H), torch.cat([seqs[r][: plens[r]] for r in order]))
        runtime.end_step()
    assert [runtimes["dense"].route_info(r).route >= 0 for r in order] == [True, False]

    positions, logs = dict(plens), []
    for step_order in (["r0", "r1"], ["r1", "r0"], ["r0", "r1"]):
        plan = decode_plan(step_order, positions, plens)
        a = torch.stack([seqs[r][positions[r]] for r in step_order])
        compact = runtimes["compact"]
        compact.begin_step(plan)
        want = compact.apply(torch.zeros(2, H), a)
        compact.end_step()
        dense, log = runtimes["dense"], OpLog()
        dense.begin_step(plan)
        with monkeypatch.context() as patched:
            host_reads_forbidden(patched)
            with log:
                dense.route_step(a)
                got = dense.add_delta(torch.zeros(2, H), a)
        dense.end_step()
        assert not [op for op, _ in log.ops if op in SYNCING]
        torch.testing.assert_close(got, want)
        routed = step_order.index("r0")
        assert got[routed].abs().max() > 0 and got[1 - routed].abs().max() == 0
        logs.append(log.ops)
        for rid in step_order:
            positions[rid] += 1
    assert logs[0] == logs[1] == logs[2]


def test_wise_task_vectors_made_in_inference_mode_are_served():
    """vLLM runs forwards under inference mode, so WISE's routable task vectors are first made there,
    as tensors without a version counter; the delta still places and reads them."""
    memory, _ = wise_memory()
    with torch.inference_mode():
        out = memory.delta(torch.randn(2, I), torch.tensor([0, NO_ROUTE]), fixed_shapes=True)
    assert out[0].abs().max() > 0 and out[1].abs().max() == 0


def test_padded_rows_past_the_step_are_unrouted():
    """A graph replays a padded batch: rows past the scheduled tokens get exactly the base output."""
    memory, prompts = make_memoir()
    runtime = MemoryRuntime(memory, dense=True, max_tokens=4)
    plen = prompts[0].shape[0]
    runtime.begin_step(BatchPlan(["r"], np.array([0, plen]), np.array([0]), np.array([plen])))
    runtime.apply(torch.zeros(plen, H), prompts[0])
    runtime.end_step()
    runtime.begin_step(decode_plan(["r"], {"r": plen}, {"r": plen}))
    a = torch.randn(8, I)  # 1 scheduled token + 7 rows of padding, past the buffers' 4 rows
    out = runtime.apply(torch.zeros(8, H), a)
    assert out[0].abs().max() > 0 and out[1:].abs().max() == 0


class FakeCompilation:
    def __init__(self, mode, splitting_ops):
        self.mode, self.splitting_ops = mode, splitting_ops


@pytest.mark.parametrize("mode_name, ops, split", [
    ("VLLM_COMPILE", ["vllm::unified_attention"], True),  # piecewise graphs (the GPU default)
    ("VLLM_COMPILE", [], False),  # one full graph: nothing is split anywhere
    ("DYNAMO_TRACE_ONCE", [], False),  # the CPU backend: traced once, nothing captured
])
def test_routing_op_is_a_splitting_op_where_vllm_splits_graphs(mode_name, ops, split):
    from vllm.config import CompilationMode

    config = FakeCompilation(getattr(CompilationMode, mode_name), list(ops))
    assert split_graphs_at_routing(config) is split
    assert (ROUTE_OP in config.splitting_ops) is split
    assert split_graphs_at_routing(config) is False  # idempotent


class ThreadGroup:
    """All-gather along the last dim between threads standing in for tensor-parallel ranks."""

    def __init__(self, ranks: int):
        import threading

        self.ranks, self.parts = ranks, [None] * ranks
        self.barrier = threading.Barrier(ranks)

    def gather(self, rank: int):
        def gather(local: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = local
            self.barrier.wait()
            full = torch.cat(self.parts, dim=-1)
            self.barrier.wait()
            return full
        return gather


def wise_memory():
    from memserve.methods import WiseConfig, WiseMemory

    g = torch.Generator().manual_seed(3)
    base = torch.randn(H, I, generator=g)
    memory = WiseMemory(WiseConfig(consolidate="ties"), base)  # a side memory set by hand below
    memory.calibrate(torch.randn(I, generator=g))
    state = {k: v.clone() for k, v in memory.state_tensors().items()}
    state.update(side=base + 0.5 * torch.randn(H, I, generator=g), side_min_score=torch.tensor(1.0),
                 counters=torch.tensor([1, 1, 0]))
    memory.load_state(state, torch.zeros(0, I, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    return memory, [3 * torch.randn(7, I, generator=g), memory.background.expand(6, I).clone()]


@pytest.mark.parametrize("method", ["memoir", "wise"])
@pytest.mark.parametrize("dense", [False, True], ids=["compact", "dense"])
def test_tensor_parallel_ranks_sum_to_the_unsharded_delta(method, dense):
    """Two ranks, each with half the features of `a` and a gather of prompt statistics, route every
    request alike and their partial deltas sum (the all-reduce) to the one-rank delta, through
    chunked prefill and decoding; also a MEMOIR request routed on its last sentence only."""
    import copy
    import threading

    memory, prompts = make_memoir() if method == "memoir" else wise_memory()
    g = torch.Generator().manual_seed(6)
    seqs = {"r0": torch.cat([prompts[0], torch.randn(3, I, generator=g)]),
            "r1": torch.cat([prompts[1], torch.randn(3, I, generator=g)]),
            "r2": torch.randn(12, I, generator=g)}
    from .test_serving_runtime import opening_sentence_then, run_schedule

    sentences = {}
    if method == "memoir":
        seqs["r3"] = torch.cat([opening_sentence_then(prompts[2]), torch.randn(3, I, generator=g)])
        sentences["r3"] = 7
    plens = {rid: seq.shape[0] - 3 for rid, seq in seqs.items()}
    steps = [[("r0", 0, 3), ("r1", 0, 4)], [("r0", 3, plens["r0"] - 3), ("r1", 4, plens["r1"] - 4), ("r2", 0, 9)],
             [("r0", plens["r0"], 2), ("r1", plens["r1"], 1), ("r2", 9, 1)], [("r1", plens["r1"] + 1, 2)]]
    if method == "memoir":
        steps[0].append(("r3", 0, 9))
        steps[1].append(("r3", 9, plens["r3"] - 9))
        steps[2].append(("r3", plens["r3"], 1))
    run = functools.partial(run_schedule, steps=steps, sentences=sentences)

    whole = MemoryRuntime(copy.deepcopy(memory), dense=dense)
    want = run(whole, seqs, plens)
    if method == "memoir":
        assert whole.route_info("r3").route == 2 and whole.memory.route(seqs["r3"][: plens["r3"]].mean(0, keepdim=True))[0] < 0
    group, half = ThreadGroup(2), I // 2
    got, runtimes = [None, None], [None, None]

    def rank(r: int):
        features = slice(r * half, (r + 1) * half)
        runtimes[r] = MemoryRuntime(copy.deepcopy(memory), dense=dense, shard=(r * half, (r + 1) * half),
                                    gather=group.gather(r))
        got[r] = run(runtimes[r], {rid: seq[:, features] for rid, seq in seqs.items()}, plens)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert any(whole.route_info(rid).route >= 0 for rid in seqs)
    for rid in seqs:
        assert runtimes[0].route_info(rid).route == runtimes[1].route_info(rid).route == whole.route_info(rid).route
        for pos, row in want[rid].items():
            torch.testing.assert_close(got[0][rid][pos] + got[1][rid][pos], row, msg=f"{rid} position {pos}")


@pytest.mark.parametrize("method", ["memoir", "wise"])
def test_the_delta_reads_the_memory_where_the_activations_are(method):
    """No GPU here: fake tensors on the "meta" device stand in for one (`FakeTensorMode` checks every
    op's devices as on a GPU; fake "cuda" tensors cannot even be sliced in a CPU-only build). Requests
    are routed on the host (a real CPU prefill); then a runtime on "meta" serves their decode-only
    steps. Every memory tensor the delta reads must be on "meta" (a CPU tensor in a device op is a
    device mismatch), nothing may be read on the host (a fake tensor has no values) and the output
    stays on "meta"; the memory's own state stays on the CPU for routing and the store."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    memory, prompts = make_memoir() if method == "memoir" else wise_memory()
    unrouted = torch.randn(9, I, generator=torch.Generator().manual_seed(5)) if method == "memoir" else prompts[1]
    seqs = {"r0": prompts[0], "r1": unrouted}
    plens = {rid: seq.shape[0] for rid, seq in seqs.items()}
    order = list(seqs)
    starts = np.cumsum([0] + [plens[r] for r in order])
    host = MemoryRuntime(memory, dense=True, max_tokens=64)
    host.begin_step(BatchPlan(order, starts, np.zeros(2, np.int64), np.array([plens[r] for r in order])))
    host.apply(torch.zeros(int(starts[-1]), H), torch.cat(list(seqs.values())))
    host.end_step()
    assert [host.route_info(r).route >= 0 for r in order] == [True, False]

    device = MemoryRuntime(memory, dense=True, device="meta", max_tokens=64)
    device.states = host.states  # the routes decided above
    positions = dict(plens)
    for step_order in (["r0", "r1"], ["r1", "r0"]):
        device.begin_step(decode_plan(step_order, positions, plens))  # host work, before the forward
        assert not device.needs_routing()
        with FakeTensorMode(allow_non_fake_inputs=True):  # the forward: host tensors may only meet device ones by error
            a = torch.randn(2, I, device="meta")
            device.route_step(a)
            out = device.add_delta(torch.zeros(2, H, device="meta"), a)
        device.end_step()
        assert out.device.type == "meta" and out.shape == (2, H)
        positions = {rid: pos + 1 for rid, pos in positions.items()}
    assert {t.device.type for t in memory.state_tensors().values()} == {"cpu"}
