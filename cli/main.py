"""`memserve` command line: a thin typer layer over the library."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Lifelong knowledge editing for served LLMs.")
store_app = typer.Typer(no_args_is_help=True, help="Inspect, check, roll back, export and import an edit store.")
model_app = typer.Typer(no_args_is_help=True, help="Manage base models.")
app.add_typer(store_app, name="store")
app.add_typer(model_app, name="model")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (JSON + PNG).")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)

STORE_OPTION = typer.Option("./memstore", "--store", help="Store directory.")


def fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _user_errors():
    from memserve.facts import FactsError
    from memserve.models import ModelError
    from memserve.store import StoreError

    return (FactsError, ModelError, StoreError, ValueError, OSError)


def _provenance() -> dict:
    """Who runs this command, kept with what it commits (`store log`)."""
    import getpass
    import shlex
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (containers)
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname(), "command": shlex.join(["memserve", *sys.argv[1:]])}


def _parse_settings(settings: list[str]) -> dict:
    values = {}
    for item in settings:
        if "=" not in item:
            fail(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            values[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            values[key.strip()] = raw
    return values


@app.command()
def edit(
    facts_file: Path = typer.Argument(..., help="Facts: JSON Lines or a JSON array of objects; - reads standard input."),
    store: Path = STORE_OPTION,
    method: Optional[str] = typer.Option(None, help="memoir or wise (default memoir for a new store)."),
    model: Optional[Path] = typer.Option(None, help="Local HF Llama-family model directory (default: embedded SmolLM2-135M-Instruct)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Edit only the first N facts."),
    layer: Optional[int] = typer.Option(None, help="Layer whose down-projection gets the memory (new stores)."),
    settings: List[str] = typer.Option([], "--set", help="Method option for a new store, e.g. --set tau=0.6."),
    skip_invalid: bool = typer.Option(False, help="Edit the good rows and report the bad ones."),
):
    """Learn facts into the store, one edit after another (resumable: stored facts are skipped).

    Example: memserve edit facts.jsonl --store ./memstore
    """
    from memserve.editor import open_session
    from memserve.facts import read_facts

    try:
        facts, problems = read_facts(facts_file, skip_invalid=skip_invalid)
        for problem in problems:
            console.print(f"[yellow]skipped:[/yellow] {problem}", highlight=False, soft_wrap=True)
        facts = facts[:limit] if limit else facts
        config = _parse_settings(settings)
        if layer is not None:
            config["layer"] = layer
        runner = open_session(store, model, method=method, config=config or None, facts=facts)
    except _user_errors() as exc:
        fail(str(exc))
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    anchoring = getattr(runner.edited.memory.config, "subject_anchor", False)
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("editing", total=len(facts))

        def advance(fact, status, record):
            progress.update(task, advance=1, description=f"{status}: {fact.prompt[:40]}")
            # One line per fact: a `committed` line is printed only once the edit is durable.
            state = "committed" if status == "added" else "already stored as"
            replaces = f", supersedes edit {record['supersedes']}" if status == "added" and "supersedes" in record else ""
            progress.console.print(f"{fact.where}: {state} edit {record['id']} (version {record['version']}{replaces})", highlight=False, soft_wrap=True)
            if status == "added" and record.get("converged") is False:
                progress.console.print(f"[yellow]{fact.where}: edit {record['id']} did not reach its stop loss in {record['steps']} "
                                       f"steps (answer loss {record['loss']:.3f}): it may not answer as asked; check it with "
                                       "`memserve eval`[/yellow]", highlight=False, soft_wrap=True)
            if status == "added" and anchoring and "anchors" not in record:
                progress.console.print(f"[yellow]{fact.where}: no subject given or found in the prompt: this edit is routed on "
                                       "its key alone and may reach questions of the same shape; add a 'subject' field[/yellow]",
                                       highlight=False, soft_wrap=True)

        try:
            report = runner.apply(facts, progress=advance, by=_provenance())
        except _user_errors() as exc:
            fail(str(exc))
        finally:
            runner.store.close()
    median = sorted(report.seconds)[len(report.seconds) // 2] if report.seconds else 0.0
    console.print(
        f"{report.added} edits added, {report.skipped} already stored, {len(problems)} invalid rows skipped; "
        f"store {store} now holds {report.total} edits; median {median:.2f} s/edit",
        highlight=False, soft_wrap=True,
    )


@app.command("eval")
def eval_(
    facts_file: Path = typer.Argument(..., help="Facts to evaluate (normally the file that was edited)."),
    store: Path = STORE_OPTION,
    backend: str = typer.Option("hf", help="hf (transformers reference) or vllm."),
    limit: Optional[int] = typer.Option(None, min=1),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON here."),
    generation: bool = typer.Option(True, help="Also measure greedy generation accuracy."),
    unedited: Optional[Path] = typer.Option(None, help="Facts file of questions nobody edited (e.g. same-template "
                                            "questions about other subjects): share reaching an edit, answers unchanged."),
):
    """Rel / Gen / Loc (and perplexity, generation accuracy) on the store's final model.

    Example: memserve eval facts.jsonl --store ./memstore --json metrics.json
    """
    from memserve.evaluate import evaluate_store
    from memserve.facts import read_facts

    try:
        facts, _ = read_facts(facts_file)
        facts = facts[:limit] if limit else facts
        probes = read_facts(unedited, skip_invalid=True)[0] if unedited else []
        with console.status("loading the store and model") as status:
            result = evaluate_store(store, facts, backend=backend, generation=generation, unedited=probes,
                                    progress=lambda phase: status.update(phase))
    except _user_errors() as exc:
        fail(str(exc))
    table = Table(title=f"{result['method']} · {result['n']} facts · backend {result['backend']}")
    columns = {name: (lambda row, name=name: row.get(name)) for name in ("rel", "gen", "loc", "gen_acc", "ppl")}
    if unedited:
        columns["unedited→edit"] = lambda row: row["unedited"]["reach_an_edit"]
        columns["unedited unchanged"] = lambda row: row["unedited"]["answers_unchanged"]
    for name in ("prompts", *columns):
        table.add_column(name)
    for label, row in (("as written", result), ("chat turn", result.get("chat"))):
        if row is not None:
            table.add_row(label, *("-" if get(row) is None else f"{get(row):.3f}" for get in columns.values()))
    Console().print(table)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    store: Path = STORE_OPTION,
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000),
):
    """OpenAI-compatible server (vLLM) answering with the store's edits. Extra options go to vLLM.

    Example: memserve serve --store ./memstore --port 8000 --max-num-seqs 64
    """
    from memserve.serving import serve as run_server

    try:
        run_server(str(store), host=host, port=port, engine_args=list(ctx.args))
    except _user_errors() as exc:
        fail(str(exc))


@app.command("route")
def route(
    question: str = typer.Argument(..., help="The question, as a client would send it."),
    store: Path = STORE_OPTION,
    chat: bool = typer.Option(False, "--chat", help="Ask it as a chat turn (what /v1/chat/completions sends)."),
    top: int = typer.Option(5, min=1, help="How many of the nearest edits to show."),
    as_json: bool = typer.Option(False, "--json", help="Print the explanation as JSON."),
):
    """Which edit a question reaches and why, without generating: the nearest edits' scores against
    the threshold, and the decision (the method's own routing rule, as served).

    Example: memserve route "What is the capital of Kenya?" --chat --store ./memstore
    """
    from memserve.editor import load_reference
    from memserve.store import Store

    try:
        edited = load_reference(store)
        result = edited.explain(edited.chat.format(question) if chat else edited.encode(question), top)
        if edited.memory.routes_are_edits:  # name the facts behind the edits
            with Store.open(store) as opened:
                for entry in [result, *result["candidates"]]:
                    if entry["route"] >= 0:
                        fact = opened.record(entry["route"])["fact"]
                        entry.update(prompt=fact["prompt"], target=fact["target"])
    except _user_errors() as exc:
        fail(str(exc))
    result = {"question": question, "chat": chat, "method": edited.memory.method, **result}
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return
    scope = " (of its last sentence: the whole question reached none)" if result["routed_on"] == "last sentence" else ""
    table = Table(title=f"nearest {len(result['candidates'])} of {edited.memory.num_edits} edits ({result['method']}){scope}")
    relation = any("relation" in entry for entry in result["candidates"])  # `relation_check` stores
    for column in ("edit", "score", "threshold", "subject named", *(("relation / min",) if relation else ()), "passes", "edited fact"):
        table.add_column(column)
    for entry in result["candidates"]:
        fact = f"{entry['prompt']} -> {entry['target']}" if "prompt" in entry else ""
        checked = (f"{entry['relation']:.3f} / {entry['relation_threshold']:.3f}" if "relation" in entry else "-",) if relation else ()
        table.add_row(entry["edit"], f"{entry['score']:.3f}", f"{entry['threshold']:.3f}", "yes" if entry["subject_named"] else "no",
                      *checked, "yes" if entry["passes"] else "no", fact)
    Console().print(table)
    if result["route"] >= 0:
        print(f"decision: {result['edit']} (score {result['score']:.3f})" + (f": {result['prompt']} -> {result['target']}" if "prompt" in result else ""))
    else:
        print("decision: no edit (no edit whose subject the question names scores above the threshold"
              + (" and asks as closely what it asks" if relation else "") + ")")


@app.command()
def demo(store: Path = typer.Option("./memstore-demo", "--store")):
    """Edit the bundled example facts and show base vs edited answers.

    Example: memserve demo --store ./memstore-demo
    """
    from memserve.demo import run_demo

    try:
        run_demo(store)
    except _user_errors() as exc:
        fail(str(exc))


@model_app.command("prepare")
def model_prepare(force: bool = typer.Option(False, help="Rebuild even if cached.")):
    """Prepare the embedded default model (once) and print its directory.

    Example: memserve model prepare
    """
    from memserve.models import prepare_default_model

    try:
        print(prepare_default_model(force=force))
    except _user_errors() as exc:
        fail(str(exc))


@contextlib.contextmanager
def _open_store(store: Path, write: bool = False):
    from memserve.store import Store

    try:
        opened = Store.open(store, readonly=not write and not os.access(store, os.W_OK))
    except _user_errors() as exc:
        fail(str(exc))
    try:
        yield opened
    except _user_errors() as exc:
        fail(str(exc))
    finally:
        opened.close()


@store_app.command("info")
def store_info(store: Path = STORE_OPTION, as_json: bool = typer.Option(False, "--json")):
    """Model, method, layer, number of edits and version.

    Example: memserve store info --store ./memstore --json
    """
    with _open_store(store) as opened:
        info = opened.info()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        print(f"{key:15} {json.dumps(value) if isinstance(value, dict) else value}")


@store_app.command("list")
def store_list(store: Path = STORE_OPTION, limit: int = typer.Option(50, min=1)):
    """The stored edits, oldest first.

    Example: memserve store list --store ./memstore --limit 20
    """
    table = Table()
    for column in ("id", "prompt", "target", "loss", "steps", "seconds"):
        table.add_column(column)
    with _open_store(store) as opened:
        for i, record in enumerate(opened.records()):
            if i >= limit:
                break
            fact = record["fact"]
            table.add_row(str(record["id"]), fact["prompt"][:60], fact["target"][:30], f"{record['loss']:.3f}", str(record["steps"]), f"{record['seconds']:.2f}")
    Console().print(table)


@store_app.command("show")
def store_show(
    edit_id: int,
    store: Path = STORE_OPTION,
    neighbours: int = typer.Option(3, min=0, help="Other edits whose routing keys are nearest to this one's."),
    server: Optional[str] = typer.Option(None, help="A running `memserve serve` (http://host:port): add this edit's hit count from its /metrics."),
):
    """One edit: its record (training fact, source, who made it), the edits its routing keys could be
    confused with, and how often a server routed requests to it.

    Example: memserve store show 3 --store ./memstore --server http://127.0.0.1:8000
    """
    with _open_store(store) as opened:
        record = opened.record(edit_id)
        out = {"record": record, "nearest_edits": _key_neighbours(opened, edit_id, neighbours)}
    if server:
        out["hits"] = _served_hits(server, edit_id)
    print(json.dumps(out, indent=2, ensure_ascii=False))


def _key_neighbours(opened, edit_id: int, count: int) -> list[dict]:
    """Other edits sharing the most active bits with any routing key of `edit_id` (MEMOIR keys)."""
    if not count or opened.manifest["method"] != "memoir":
        return []
    keys, owners = opened.routing_keys(opened.manifest["intermediate_size"])
    own = keys[owners == edit_id]
    best: dict[int, int] = {}
    for key in own:
        for other, shared in opened.nearest(key, count + len(own) + 1):  # its own keys come first
            if other != edit_id:
                best[other] = max(best.get(other, 0), shared)
    top_k = opened.manifest["config"]["top_k"]
    ranked = sorted(best.items(), key=lambda item: -item[1])[:count]
    return [{"edit": other, "shared_bits": shared, "overlap": shared / top_k, "prompt": opened.record(other)["fact"]["prompt"]}
            for other, shared in ranked]


def _served_hits(server: str, edit_id: int) -> float | None:
    """`memserve_edit_hits_total` of this edit on `server`'s /metrics (None: not among the exported ones)."""
    import re
    import urllib.request

    try:
        with urllib.request.urlopen(server.rstrip("/") + "/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError as exc:
        fail(f"{server}/metrics: {exc}")
    found = re.search(rf'^memserve_edit_hits_total{{edit="edit-{edit_id}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


@store_app.command("log")
def store_log(store: Path = STORE_OPTION, as_json: bool = typer.Option(False, "--json")):
    """Every version: when, what (edit, rollback, ...), which fact from which file and line, and who
    ran which command.

    Example: memserve store log --store ./memstore
    """
    with _open_store(store) as opened:
        entries = opened.log()
    if as_json:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
        return
    table = Table()
    for column in ("version", "time", "op", "what", "source", "by"):
        table.add_column(column)
    for entry in entries:
        record = entry.get("record") or {}
        by = record.get("by") or entry.get("by") or {}
        if record:
            what = f"edit {record['id']}: {record['fact']['prompt'][:50]} -> {record['fact']['target'][:30]}"
        elif entry["op"] == "rollback":
            what = f"rollback to version {entry['to']}"
        else:
            what = f"{entry['edits']} edits"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["time"]))
        who = f"{by['user']}@{by['host']}: {by['command']}" if by else ""
        table.add_row(str(entry["version"]), when, entry["op"], what, record.get("source", ""), who)
    Console().print(table)


@store_app.command("verify")
def store_verify(store: Path = STORE_OPTION):
    """Check every record, tensor and index entry; exit 1 on any problem.

    Example: memserve store verify --store ./memstore
    """
    with _open_store(store) as opened:
        problems = opened.verify(width=opened.manifest.get("intermediate_size"))
        summary = f"ok: {opened.num_edits} edits, version {opened.version}"
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        raise typer.Exit(1)
    print(summary)


@store_app.command("versions")
def store_versions(store: Path = STORE_OPTION):
    """The kept versions: what made each one and how many edits it had (* = current).

    Example: memserve store versions --store ./memstore
    """
    table = Table()
    for column in ("version", "made by", "edits", "time", "rollback"):
        table.add_column(column)
    with _open_store(store) as opened:
        current = opened.version
        for entry in opened.versions():
            made_by = {"edit": f"edit {entry['edits'] - 1}", "rollback": f"rollback to {entry.get('to')}"}.get(entry["op"], entry["op"])
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["time"]))
            mark = "*" if entry["version"] == current else ""
            table.add_row(f"{entry['version']}{mark}", made_by, str(entry["edits"]), when, "yes" if entry["tensor_sums"] is not None else "no (bulk)")
    Console().print(table)


@store_app.command("rollback")
def store_rollback(to: int = typer.Option(..., "--to", help="Version to return to (see `store versions`)."), store: Path = STORE_OPTION):
    """Make an earlier version current again, as a new version (later edits stay recoverable).

    Example: memserve store rollback --to 12 --store ./memstore
    """
    with _open_store(store, write=True) as opened:
        version = opened.rollback(to, by=_provenance())
        print(f"version {version}: the edits and memory of version {to} ({opened.num_edits} edits)")


@store_app.command("compact")
def store_compact(keep_versions: int = typer.Option(..., "--keep-versions", min=1, help="Versions to keep rollback-able, the current one included."),
                  store: Path = STORE_OPTION):
    """Forget memory history older than the last N versions (rollback then reaches back N - 1
    versions); every edit's record stays. Freed space is reused by later edits; `store export` +
    `store import` writes a smaller file.

    Example: memserve store compact --keep-versions 10 --store ./memstore
    """
    with _open_store(store, write=True) as opened:
        done = opened.compact(keep_versions)
        print(f"history kept from version {done['history_from']} (current {opened.version}): "
              f"{done['versions_dropped']} older versions dropped, {done['bytes_freed'] / 2**20:.1f} MiB of undo freed")


@store_app.command("export")
def store_export(file: Path = typer.Argument(..., help="File to write (a tar: JSON header + compacted LMDB)."), store: Path = STORE_OPTION):
    """Write the whole store (edits, memory, history) as one portable file.

    Example: memserve store export backup.memstore --store ./memstore
    """
    with _open_store(store) as opened, console.status(f"exporting {opened.num_edits} edits to {file}"):
        header = opened.export(file)
    print(f"{file}: {header['edits']} edits, version {header['version']}, {file.stat().st_size} bytes")


@store_app.command("import")
def store_import(file: Path = typer.Argument(..., help="A file written by `store export`."), store: Path = STORE_OPTION):
    """Create a store from an exported file (checked before it appears at --store).

    Example: memserve store import backup.memstore --store ./restored
    """
    from memserve.store import Store

    try:
        with console.status(f"checking and importing {file}"), Store.import_file(file, store) as imported:
            print(f"{store}: {imported.num_edits} edits, version {imported.version}")
    except _user_errors() as exc:
        fail(str(exc))


@bench_app.command("throughput")
def bench_throughput(
    store: Optional[Path] = typer.Option(None, "--store", help="Store of real edits the points build on (default: the cached 24-edit test store); larger points add synthetic edits."),
    facts: Optional[Path] = typer.Option(None, "--facts", help="Instead of --store: train the largest --edits count of real edits from this facts file (built once, cached under the memserve cache)."),
    method: str = typer.Option("memoir", help="Method of the store built from --facts or the default store."),
    edits: str = typer.Option("0,100,1000,10000", help="Comma-separated edit counts (0, or at least the store's edits)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the rows as JSON here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the throughput-vs-edits PNG here."),
    modes: str = typer.Option("offline,http", help="offline (vllm.LLM), http (memserve serve, streaming clients), http-unary (non-streaming clients)."),
    requests: int = typer.Option(64, min=1, help="Requests per round (half ask edited facts)."),
    max_tokens: int = typer.Option(32, min=1, help="Output tokens per request (EOS ignored)."),
    rounds: int = typer.Option(6, min=1, help="Timed rounds per engine and point, in adjacent unedited/edited pairs."),
    concurrency: int = typer.Option(64, min=1, help="Concurrent HTTP clients (default: every request of a round in flight, as offline)."),
    hf_requests: int = typer.Option(4, min=0, help="Requests of the transformers batch-1 baseline per point (0: skip)."),
    dtype: str = typer.Option("float32"),
    system_prompt: bool = typer.Option(False, "--system-prompt", help="Every request is a chat turn after one shared ~210-token system prompt."),
    caching_off: bool = typer.Option(False, "--caching-off", help="Also compare each edited point with the same store served with prefix caching off."),
    workdir: Optional[Path] = typer.Option(None, help="Keep the synthetic stores and server logs here (default: a removed temp dir)."),
):
    """Output tokens/s and latency with N edits vs the unedited engine of the same run (same engine
    options on both sides, prefix caching on).

    Example: memserve bench throughput --edits 0,1000 --system-prompt --caching-off --json out.json
    """
    from memserve.bench import MODES, main_throughput
    from memserve.methods import METHODS

    try:
        counts = [int(x) for x in edits.split(",") if x.strip()]
        chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
        if not counts or any(n < 0 for n in counts) or not chosen or set(chosen) - set(MODES):
            fail(f"--edits wants non-negative counts and --modes some of {','.join(MODES)}; got {edits!r}, {modes!r}")
        if store is not None and facts is not None:
            fail("--store and --facts exclude each other")
        if method not in METHODS:
            fail(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
        rows = main_throughput(
            store, counts, json_out, plot, workdir, facts=facts, method=method, modes=chosen, requests=requests,
            max_tokens=max_tokens, rounds=rounds, concurrency=concurrency, hf_requests=hf_requests, dtype=dtype,
            system_prompt=system_prompt, caching_off=caching_off, log=lambda m: console.print(m, highlight=False),
        )
    except _user_errors() as exc:
        fail(str(exc))
    for row in rows:
        print(json.dumps({k: row[k] for k in ("edits", "synthetic_edits", "output_tok_s", "unedited_output_tok_s", "ratio")}))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
