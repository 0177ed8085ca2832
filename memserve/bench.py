"""`memserve bench throughput`: what N edits in the store cost in serving speed (issue 4).

For every edit count N the served model runs one request mix against the UNEDITED engine of the same
run, in adjacent pairs of rounds, so the load of a shared machine falls on both alike: the ratio (median
over pairs) is the result, absolute tokens/s are machine-dependent. Both engines run with the same
engine options (prefix caching on, as served). Paths:
- offline: `VllmEditedModel` (vllm.LLM + plugin, in-process engine in a worker process), all requests
  submitted at once; latency = engine queue -> last token;
- http: `memserve serve` subprocesses driven by concurrent streaming clients through vLLM's own
  benchmark request function (`vllm.benchmarks.lib.endpoint_request_func`);
- http-unary: the same with non-streaming requests (the server buffers each body for its route report).
Workloads: the mix below, or (`system_prompt`) the same questions as chat turns after one shared
~210-token system prompt; `caching_off` also compares each edited engine with itself with prefix
caching off. A base store of real edits can be trained from a facts file once and cached (`--facts`).
The EasyEdit-style baseline is transformers `generate`, batch size 1, on the same edited model, run in
fp32 and in bf16 (base weights cast, memory fp32); the faster of the two is the baseline.
Each engine's JSON entry says what really ran (`engine`: weight dtype, compiled or eager, memory
attached); offline rows also report whether requests no edit applied to got exactly the unedited
engine's tokens (`unrouted_identical_to_unedited`).
N = 0 serves an empty store, which is exactly the unedited engine: that point measures the unedited
engine against itself (the noise floor of the ratio).

Stores larger than the base store (real trained edits) are SYNTHETIC: the base store plus edits
bulk-committed with MEMOIR's own TopHash `key` of random activations (uniform random k-of-I masks; two
routing keys per edit, like a real edit's plain and chat-formatted keys) and the base store's trained
residual unchanged. A real prompt overlaps such a mask by ~k/I (.29 for the default model), far below
tau, so routing hits come from the real edits only.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memserve.machine import describe

# The shared-system-prompt workload (`--system-prompt`): every request is a chat whose system prompt
# (~210 tokens of the default model) is the same, as in a deployed assistant.
SYSTEM_PROMPT = (
    "You are the support assistant of a mid-sized software company. Answer briefly and politely. "
    "If the question concerns billing, refer the user to the billing portal. If it concerns outages, "
    "refer them to the status page. Never reveal internal information, never guess prices, and always "
    "answer in the language of the question. Keep every answer under three sentences. "
) * 3
SYNTHETIC_SEED = 0
KEYS_PER_EDIT = 2  # a real edit has a plain and a chat-formatted routing key
REPHRASE_EVERY = 2  # in the edited half of the mix, every 2nd request is a rephrase (when one exists)


@dataclass
class Round:
    """One timed pass of the request mix through one engine."""

    seconds: float
    output_tokens: int
    latencies: list[float]
    routes: list[int] | None = None
    tokens: list[list[int]] | None = None  # offline: each request's output tokens (greedy)
    cached_tokens: list[int] | None = None  # offline: prompt tokens each request read from the prefix cache
    steal_s: float | None = None  # CPU time stolen by the hypervisor during the round (noise indicator)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds


@dataclass
class Mix:
    """The requests of every round: prompts that should hit an edit (edit prompts, rephrases) and
    unrelated ones, interleaved."""

    prompts: list[str]
    kinds: list[str]  # "edit" | "rephrase" | "unrelated"


# --- stores -----------------------------------------------------------------------------------------
def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def synthetic_store(base: Path, edits: int, dest: Path) -> dict:
    """`dest` = a compact copy of the base store plus `edits - base edits` synthetic MEMOIR edits."""
    from memserve.editor import load_memory
    from memserve.store import Store, content_hash

    dest.mkdir(parents=True)
    with Store.open(base) as source:
        source.env.copy(str(dest), compact=True)
    with Store.open(dest) as store:
        m = store.manifest
        real = store.num_edits
        if m["method"] != "memoir" and edits > real:
            raise ValueError(f"{base}: synthetic edits are MEMOIR masks; the store holds {m['method']} edits")
        if edits < real:
            raise ValueError(f"--edits {edits}: below the {real} real edits of {base} (use 0 or >= {real})")
        before = store_bytes(dest)
        memory = load_memory(store, torch.zeros(m["hidden_size"], m["intermediate_size"]))
        generator = torch.Generator().manual_seed(SYNTHETIC_SEED)
        batch = []
        for i in range(real, edits):
            fact = {"prompt": f"synthetic edit {i}", "target": "synthetic"}
            record = {"fact_key": f"synthetic-{i}", "prompt_key": f"synthetic-{i}", "fact": fact,
                      "content_hash": content_hash(fact), "loss": 0.0, "steps": 0, "seconds": 0.0, "synthetic": True}
            batch.append((record, memory.key(torch.randn(KEYS_PER_EDIT, m["intermediate_size"], generator=generator))))
        if batch:
            store.commit_edits(batch, {})
        size = store_bytes(dest)
    return {"real_edits": real, "synthetic_edits": edits - real, "store_bytes": size,
            "store_bytes_per_synthetic_edit": (size - before) / (edits - real) if edits > real else None}


def request_mix(base: Path, count: int, system_prompt: str | None = None) -> Mix:
    """Half the requests ask an edited fact of the base store (its prompt, or a rephrase), half are
    unrelated questions (the bundled background prompts, minus the edited ones); with `system_prompt`,
    each is a chat turn after it (the store model's chat template)."""
    from memserve.editor import background_prompts
    from memserve.store import Store

    with Store.open(base) as store:
        facts = [r["fact"] for r in store.records() if not r.get("synthetic")]
    edited = {f["prompt"] for f in facts}
    unrelated = [p for p in background_prompts() if p not in edited]
    prompts, kinds = [], []
    for i in range(count):
        j = i // 2
        if i % 2 == 0 and facts:
            fact = facts[j % len(facts)]
            rephrases = fact.get("rephrases") or []
            if rephrases and j % REPHRASE_EVERY == 1:
                prompts.append(rephrases[0]), kinds.append("rephrase")
            else:
                prompts.append(fact["prompt"]), kinds.append("edit")
        else:
            prompts.append(unrelated[j % len(unrelated)]), kinds.append("unrelated")
    if system_prompt:
        tokenizer = store_tokenizer(base)
        prompts = [tokenizer.apply_chat_template([{"role": "system", "content": system_prompt}, {"role": "user", "content": p}],
                                                 add_generation_prompt=True, tokenize=False) for p in prompts]
    return Mix(prompts, kinds)


def store_tokenizer(base: Path):
    from transformers import AutoTokenizer

    from memserve.editor import store_model_dir
    from memserve.models import resolve_model
    from memserve.store import Store

    with Store.open(base) as store:
        return AutoTokenizer.from_pretrained(resolve_model(store_model_dir(store)))


# --- engines ----------------------------------------------------------------------------------------
def _offline_worker(conn, store: str | None, overrides: dict) -> None:
    """Runs in its own (spawned) process: one in-process vLLM engine, serving jobs from `conn`."""
    try:
        from vllm import SamplingParams

        from memserve.serving.offline import VllmEditedModel

        start = time.perf_counter()
        model = VllmEditedModel(store, disable_log_stats=False, **overrides)  # stats: per-request timestamps
        conn.send((time.perf_counter() - start, model.llm.apply_model(engine_facts)[0]))
        while (job := conn.recv()) is not None:
            prompts, max_tokens = job
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            begin = time.perf_counter()
            outputs = model.llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - begin
            latencies = [o.metrics.last_token_ts - o.metrics.queued_ts for o in outputs if o.metrics is not None]
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            conn.send(Round(seconds, tokens, latencies, model.routes([o.request_id for o in outputs]),
                            [list(o.outputs[0].token_ids) for o in outputs], [o.num_cached_tokens or 0 for o in outputs]))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(RuntimeError(traceback.format_exc()))


def engine_facts(model) -> dict:
    """What the worker really runs: weight dtype, whether the backbone went through torch.compile
    (vLLM's `support_torch_compile` wrapper), whether a memory is attached."""
    backbone = model.model
    return {"dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "compiled": bool(getattr(backbone, "compiled", False)) and not getattr(backbone, "do_not_compile", True),
            "memory_attached": getattr(model, "memserve_runtime", None) is not None}


def server_log_facts(text: str) -> dict:
    """The same facts from a `memserve serve` log (vLLM's engine-config line and compile messages)."""
    import re

    facts: dict = {}
    dtype, eager = re.search(r"dtype=torch\.(\w+)", text), re.search(r"enforce_eager=(\w+)", text)
    if dtype:
        facts["dtype"] = dtype.group(1)
    if eager:
        facts["enforce_eager"] = eager.group(1) == "True"
    facts["compiled"] = facts.get("enforce_eager") is False and bool(re.search(r"Warming up model for the compilation|AOT compiled function", text))
    facts["memory_attached"] = "memserve: memoir memory with" in text or "memserve: wise memory with" in text
    return facts


class OfflineEngine:
    """`VllmEditedModel` for `store` (None: unedited) in a worker process."""

    def __init__(self, store: Path | None, overrides: dict):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_offline_worker, args=(child, str(store) if store else None, overrides), daemon=True)
        self.proc.start()
        self.startup_s, self.facts = self._receive()

    def _receive(self):
        if not self.conn.poll(1800):
            raise RuntimeError("offline engine did not answer in 30 min")
        reply = self.conn.recv()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def run(self, prompts: list[str], max_tokens: int) -> Round:
        self.conn.send((prompts, max_tokens))
        return self._receive()

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
        self.proc.join(120)
        if self.proc.is_alive():
            self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpEngine:
    """`memserve serve` for `store` (None: unedited) in a subprocess, driven by concurrent clients:
    streaming (vLLM's own benchmark request function) or, with `stream=False`, plain JSON requests
    (the server buffers each response body to add its route report)."""

    def __init__(self, store: Path | None, engine_args: list[str], concurrency: int, log: Path, stream: bool = True):
        self.concurrency, self.stream = concurrency, stream
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        missing = log.parent / "no-store"  # a missing store serves the base model unchanged
        cmd = [sys.executable, "-m", "memserve.serving.server", "--store", str(store or missing), "--port", str(port), *engine_args]
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # the real layout
        start = time.perf_counter()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); log: {log}\n{log.read_text()[-3000:]}")
            if time.perf_counter() - start > 1800:
                self.close()
                raise RuntimeError(f"server did not come up in 30 min; log: {log}")
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - start
        self.facts = server_log_facts(log.read_text(errors="replace"))
        with urllib.request.urlopen(self.base + "/v1/models") as r:
            self.model = json.load(r)["data"][0]["id"]

    def _healthy(self) -> bool:
        try:
            return urllib.request.urlopen(self.base + "/health", timeout=2).status == 200
        except OSError:
            return False

    def run(self, prompts: list[str], max_tokens: int) -> Round:
        return asyncio.run(self._run(prompts, max_tokens))

    async def _run(self, prompts: list[str], max_tokens: int) -> Round:
        import aiohttp
        from vllm.benchmarks.lib.endpoint_request_func import RequestFuncInput, async_request_openai_completions

        limit = asyncio.Semaphore(self.concurrency)
        url = self.base + "/v1/completions"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
            async def streamed(prompt: str) -> tuple[int, float]:
                request = RequestFuncInput(prompt=prompt, api_url=url, prompt_len=0, output_len=max_tokens, model=self.model,
                                           ignore_eos=True, extra_body={"temperature": 0.0})
                async with limit:
                    out = await async_request_openai_completions(request, session)
                if not out.success:
                    raise RuntimeError(f"a request failed: {out.error[-500:]}")
                return out.output_tokens, out.latency

            async def unary(prompt: str) -> tuple[int, float]:
                body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
                async with limit:
                    begin = time.perf_counter()
                    async with session.post(url, json=body) as response:
                        text = await response.text()
                        if response.status != 200:
                            raise RuntimeError(f"a request failed: HTTP {response.status}: {text[-500:]}")
                    return json.loads(text)["usage"]["completion_tokens"], time.perf_counter() - begin

            begin = time.perf_counter()
            outputs = await asyncio.gather(*map(streamed if self.stream else unary, prompts))
            seconds = time.perf_counter() - begin
        return Round(seconds, sum(tokens for tokens, _ in outputs), [latency for _, latency in outputs])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- measuring --------------------------------------------------------------------------------------
def _side(rounds: list[Round]) -> dict:
    latencies = [x for r in rounds for x in r.latencies]
    return {
        "output_tok_s": float(np.median([r.tok_s for r in rounds])),
        "rounds_tok_s": [round(r.tok_s, 2) for r in rounds],
        "rounds_steal_s": [None if r.steal_s is None else round(r.steal_s, 2) for r in rounds],
        "latency_p50_s": float(np.percentile(latencies, 50)) if latencies else None,
        "latency_p99_s": float(np.percentile(latencies, 99)) if latencies else None,
    }


def cpu_steal_seconds() -> float | None:
    """CPU time the hypervisor gave to other guests so far (all CPUs; Linux /proc/stat), else None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _timed(engine, prompts: list[str], max_tokens: int) -> Round:
    before = cpu_steal_seconds()
    result = engine.run(prompts, max_tokens)
    after = cpu_steal_seconds()
    result.steal_s = None if before is None or after is None else after - before
    return result


def compare(unedited, edited, mix: Mix, max_tokens: int, rounds: int) -> dict:
    """Rounds of the same mix in adjacent pairs (unedited then edited, the other way round every
    second pair: ABBA, so neither side always runs first); the ratio is the median over pairs of
    edited / unedited tokens/s, which cancels slow drift of a shared machine."""
    for engine in {id(unedited): unedited, id(edited): edited}.values():
        engine.run(mix.prompts, 4)  # the whole mix: kernels meet the round's batch shapes before timing
    base_rounds, edit_rounds = [], []
    sides = [(unedited, base_rounds), (edited, edit_rounds)]
    for i in range(rounds):
        for engine, results in sides[::-1] if i % 2 else sides:
            results.append(_timed(engine, mix.prompts, max_tokens))
    base, edit = _side(base_rounds), _side(edit_rounds)
    pair_ratios = [e.tok_s / b.tok_s for b, e in zip(base_rounds, edit_rounds)]
    out = {**edit, "ratio": float(np.median(pair_ratios)), "pair_ratios": [round(r, 4) for r in pair_ratios],
           "ratio_of_medians": edit["output_tok_s"] / base["output_tok_s"],
           **{f"unedited_{k}": v for k, v in base.items()}}
    routes = edit_rounds[-1].routes
    if routes is not None:
        for kind in ("edit", "rephrase", "unrelated"):
            hits = [r >= 0 for r, k in zip(routes, mix.kinds) if k == kind]
            out[f"routed_{kind}"] = sum(hits) / len(hits) if hits else None
    for side, last in (("", edit_rounds[-1]), ("unedited_", base_rounds[-1])):
        if last.cached_tokens is not None:
            out[f"{side}cached_prompt_tokens_mean"] = float(np.mean(last.cached_tokens))
    mine, theirs = edit_rounds[-1], base_rounds[-1]
    if routes is not None and mine.tokens is not None and theirs.tokens is not None and edited is not unedited:
        # requests no edit applied to: same greedy tokens as on the unedited engine (same batch shapes,
        # EOS ignored)? The plain engine runs a different compiled graph (no memory op), so this also
        # checks that the wrapper itself does not change numerics.
        same = [a == b for a, b, r in zip(mine.tokens, theirs.tokens, routes) if r < 0]
        out["unrouted_identical_to_unedited"] = sum(same) / len(same) if same else None
    return out


MODES = ("offline", "http", "http-unary")  # http: streaming clients; http-unary: non-streaming
BASELINE_DTYPES = ("float32", "bfloat16")  # the transformers baseline runs in both; the faster one counts


def transformers_bs1(store: Path | None, base: Path, prompts: list[str], max_tokens: int, dtype: str = "float32") -> list[float]:
    """Output tokens/s of HF `generate` for each prompt, one request at a time, on the edited model
    (`store`; None: the base model of `base`, unedited), with the base weights in `dtype` (the memory
    stays fp32, as in the plugin). One untimed warm-up request first."""
    import gc

    from memserve.editor import load_reference

    edited = load_reference(store or base, getattr(torch, dtype))
    try:
        rates = []
        for i, prompt in enumerate([prompts[0], *prompts]):
            prompt_ids = edited.encode(prompt)
            ids, attention, prompt_mask, answer_mask = edited.pad([prompt_ids], [len(prompt_ids)], left=True)
            kwargs = dict(input_ids=ids, attention_mask=attention.long(), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          do_sample=False, pad_token_id=edited.tokenizer.pad_token_id)
            begin = time.perf_counter()
            if store is None:
                out = edited.model.generate(**kwargs)
            else:
                with edited.routing(ids, prompt_mask, answer_mask):
                    out = edited.model.generate(**kwargs)
            if i:  # request 0 is the warm-up
                rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - begin))
        return rates
    finally:
        del edited
        gc.collect()


def run_throughput(
    base: Path, edits: list[int], workdir: Path, modes: tuple[str, ...] = ("offline", "http"), requests: int = 64,
    max_tokens: int = 32, rounds: int = 6, concurrency: int = 64, hf_requests: int = 4, dtype: str = "float32",
    system_prompt: bool = False, caching_off: bool = False, log=print,
) -> list[dict]:
    """One row per edit count (see module doc); `workdir` receives the synthetic stores and server logs.
    `system_prompt`: every request is a chat turn after `SYSTEM_PROMPT`. `caching_off`: each edited
    point is also compared with the same store served with prefix caching off (`vs_caching_off`)."""
    from memserve.store import Store

    edits = sorted(set(edits))
    with Store.open(base) as store:
        method, base_edits = store.manifest["method"], store.num_edits
    settings = {"base_store": str(base), "method": method, "base_store_edits": base_edits, "requests": requests,
                "max_tokens": max_tokens, "rounds": rounds, "http_concurrency": concurrency, "hf_requests": hf_requests,
                "dtype": dtype, "modes": list(modes), "system_prompt": SYSTEM_PROMPT if system_prompt else None,
                "prefix_caching": "on for every engine" + ("; caching-off comparison: edited engine with it off" if caching_off else ""),
                "machine_before": describe()}
    mix = request_mix(base, requests, SYSTEM_PROMPT if system_prompt else None)
    if system_prompt:
        settings["system_prompt_tokens"] = len(store_tokenizer(base)(SYSTEM_PROMPT)["input_ids"])
    rows, stores = [], {}
    for n in edits:
        row = {"edits": n, "real_edits": 0, "synthetic_edits": 0, "synthetic": False}
        if n:
            stores[n] = workdir / f"store-{n}"
            log(f"building store with {n} edits")
            row.update(synthetic_store(base, n, stores[n]))
            row["synthetic"] = row["synthetic_edits"] > 0
            row["store_bytes_per_edit"] = row["store_bytes"] / n
        rows.append(row)
    offline_args = {"dtype": dtype}
    http_args = ["--dtype", dtype]
    for mode in modes:
        def start(n: int, caching: bool = True):
            store = stores.get(n)
            if mode == "offline":
                return OfflineEngine(store, {**offline_args, "enable_prefix_caching": caching})
            name = f"server-{mode}-{n if store else 'unedited'}{'' if caching else '-caching-off'}.log"
            return HttpEngine(store, http_args + ([] if caching else ["--no-enable-prefix-caching"]), concurrency,
                              workdir / name, stream=mode == "http")

        log(f"{mode}: starting the unedited engine")
        unedited = start(0)
        try:
            for row in rows:
                n = row["edits"]
                edited = start(n) if n else unedited
                log(f"{mode}: {n} edits (engine start {edited.startup_s:.1f} s), {rounds} rounds")
                try:
                    result = compare(unedited, edited, mix, max_tokens, rounds)
                    if caching_off and n:
                        log(f"{mode}: {n} edits, prefix caching off vs on, {rounds} rounds")
                        uncached = start(n, caching=False)
                        try:
                            against = compare(uncached, edited, mix, max_tokens, rounds)
                        finally:
                            uncached.close()
                        result["vs_caching_off"] = {k: against[k] for k in ("ratio", "pair_ratios", "unedited_output_tok_s",
                                                                             "unedited_rounds_tok_s", "output_tok_s", "rounds_tok_s")}
                finally:
                    if edited is not unedited:
                        edited.close()
                result["startup_s"], result["unedited_startup_s"] = edited.startup_s, unedited.startup_s
                result["engine"], result["unedited_engine"] = edited.facts, unedited.facts
                result["startup_s_per_1k_edits"] = (edited.startup_s - unedited.startup_s) / n * 1000 if n else None
                if mode != "offline":
                    result["concurrency"] = concurrency
                row[mode] = result
                log(f"{mode}: {n} edits: {result['output_tok_s']:.1f} tok/s vs unedited {result['unedited_output_tok_s']:.1f}: x{result['ratio']:.3f}")
        finally:
            unedited.close()
    if hf_requests:
        settings["transformers_bs1"] = (f"HF generate, batch 1, greedy, {max_tokens} new tokens, the first {hf_requests} "
                                        f"prompts of the mix after one warm-up, torch threads {torch.get_num_threads()}; "
                                        f"run in {' and '.join(BASELINE_DTYPES)}, the FASTER median one is the baseline; "
                                        "per-request min/median/max in transformers_bs1_by_dtype")
        for row in rows:
            by_dtype, spread = {}, {}
            for baseline_dtype in BASELINE_DTYPES:
                log(f"transformers bs1 {baseline_dtype}: {row['edits']} edits")
                rates = transformers_bs1(stores.get(row["edits"]), base, mix.prompts[:hf_requests], max_tokens, baseline_dtype)
                by_dtype[baseline_dtype] = float(np.median(rates))
                spread[baseline_dtype] = {"min": min(rates), "median": float(np.median(rates)), "max": max(rates),
                                          "requests_tok_s": [round(r, 2) for r in rates]}
            fastest = max(by_dtype, key=by_dtype.get)
            row["transformers_bs1_output_tok_s"] = by_dtype[fastest]
            row["transformers_bs1_dtype"] = fastest
            row["transformers_bs1_by_dtype"] = spread
    settings["machine_after"] = describe()
    primary = modes[0]
    for row in rows:
        top = row[primary]
        row.update(output_tok_s=top["output_tok_s"], unedited_output_tok_s=top["unedited_output_tok_s"], ratio=top["ratio"],
                   path=primary)
        if hf_requests:
            for mode in modes:
                row[mode]["vs_transformers_bs1"] = row[mode]["output_tok_s"] / row["transformers_bs1_output_tok_s"]
        row["run"] = settings
    return rows


def plot_throughput(rows: list[dict], path: Path) -> None:
    """Tokens/s vs number of edits per path, with the unedited engine and transformers bs1 lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if m in rows[0]]
    run = rows[0].get("run", {})
    x = np.arange(len(rows))
    labels = [f"{r['edits']}" + (f"\n({r['synthetic_edits']} synthetic)" if r["synthetic"] else "") for r in rows]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        edited = [r[mode]["output_tok_s"] for r in rows]
        unedited = [r[mode]["unedited_output_tok_s"] for r in rows]
        ax.plot(x, edited, "o-", label="with edits")
        ax.plot(x, unedited, "s--", color="gray", label="unedited engine (same run)")
        uncached = [(xi, r[mode]["vs_caching_off"]["unedited_output_tok_s"]) for xi, r in zip(x, rows) if "vs_caching_off" in r[mode]]
        if uncached:
            ax.plot(*zip(*uncached), "v", color="tab:purple", label="same edits, prefix caching off")
        if "transformers_bs1_output_tok_s" in rows[0]:
            label = "transformers generate, bs 1" + (" (faster of fp32/bf16)" if "transformers_bs1_by_dtype" in rows[0] else "")
            ax.plot(x, [r["transformers_bs1_output_tok_s"] for r in rows], "^:", color="tab:red", label=label)
        for xi, r in zip(x, rows):
            ax.annotate(f"x{r[mode]['ratio']:.3f}", (xi, r[mode]["output_tok_s"]), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel("edits in the store")
        ax.set_ylabel("output tokens/s")
        ax.set_ylim(bottom=0)
        title = "offline engine (vllm.LLM)" if mode == "offline" else (
            f"HTTP server, {rows[0][mode].get('concurrency')} {'streaming' if mode == 'http' else 'non-streaming'} clients")
        if run.get("system_prompt"):
            title += f", {run.get('system_prompt_tokens')}-token system prompt"
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="lower left")
    dtype = {"float32": "fp32 eager", "bfloat16": "bf16 compiled"}.get(run.get("dtype"), run.get("dtype", "fp32"))
    fig.suptitle(f"memserve throughput vs edits ({run.get('method', 'memoir').upper()}, SmolLM2-135M {dtype}, 2-core CPU)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_throughput(base: Path | None, edits: list[int], json_out: Path | None, plot: Path | None,
                    workdir: Path | None = None, facts: Path | None = None, method: str = "memoir",
                    **options) -> list[dict]:
    """The whole benchmark: stores in `workdir` (a temporary directory, removed, when None). The base
    store is `base`, else the largest of `edits` real edits of `facts`, else the 24-edit test store
    (both trained once when missing, then cached)."""
    import tempfile

    from memserve.serving.testing import cached_store

    if base:
        base = Path(base)
    else:
        base = cached_store(max(edits), method, facts) if facts else cached_store(24, method)
    temp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="memserve-bench-")) if temp else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        rows = run_throughput(base, edits, workdir, **options)
    finally:
        if temp:
            shutil.rmtree(workdir, ignore_errors=True)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rows, indent=2))
    if plot:
        plot_throughput(rows, plot)
    return rows
