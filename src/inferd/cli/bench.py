"""``inferd bench chat / embed / rerank / render``: load any OpenAI-compatible, TEI or Cohere endpoint.

Like ``inferd run``, a client only: it speaks HTTP (httpx, imported when a command runs, so
``inferd --help`` stays fast) and never imports torch or the engines. The work is in
``inferd.bench``; see docs/BENCH.md for what each figure means.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from inferd.cli.client import DEFAULT_URL, first_key
from inferd.cli.models import fail

bench_app = typer.Typer(
    name="bench",
    help="Load an OpenAI-compatible, TEI or Cohere endpoint (inferd or any other server) and report "
    "throughput and latency per concurrency level.",
    no_args_is_help=True,
)

UrlOption = Annotated[
    str, typer.Option("--url", envvar="INFERD_URL", help="The server's base URL (a trailing /v1 is fine).")
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="The model to name in requests (default: the first listed by GET /v1/models, "
        "the first of this kind when the listing says kinds).",
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar=["INFERD_API_KEY", "OPENAI_API_KEY"],
        help="Sent as Authorization: Bearer KEY; never written to the report.",
        show_default=False,
    ),
]
ConcurrencyOption = Annotated[
    str, typer.Option("--concurrency", "-c", help="Comma-separated levels, each its own requests: 1,8,32.")
]
RequestsOption = Annotated[
    int | None,
    typer.Option("--requests", "-n", min=1, help="Requests per level (default: 4 per worker, at least 16)."),
]
WarmupOption = Annotated[
    int,
    typer.Option(
        "--warmup", min=0, help="Unmeasured requests first, on inputs that are not the measured ones."
    ),
]
TimeoutOption = Annotated[
    float,
    typer.Option("--timeout", min=0.001, help="Seconds one request may take in all; past it, an error."),
]
JsonOption = Annotated[
    Path | None,
    typer.Option(
        "--json",
        help="Write the report (command, settings, per-level figures, raw per-request samples).",
        dir_okay=False,
    ),
]
TextsOption = Annotated[
    Path | None,
    typer.Option(
        "--texts",
        help="Passages, one per line (default: 128 built-in passages of 10-110 words).",
        exists=True,
        dir_okay=False,
    ),
]


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


@bench_app.command("chat")
def chat(
    ctx: typer.Context,
    url: UrlOption = DEFAULT_URL,
    model: ModelOption = None,
    api_key: ApiKeyOption = None,
    concurrency: ConcurrencyOption = "1,8,32",
    requests: RequestsOption = None,
    warmup: WarmupOption = 2,
    timeout: TimeoutOption = 600.0,
    json_path: JsonOption = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help='JSON lines of {"messages": [...]}, or plain lines (one user message '
            "each); default: 64 built-in prompts.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="max_tokens of every request.")
    ] = 128,
    ignore_eos: Annotated[
        bool,
        typer.Option(
            "--ignore-eos",
            help="Send ignore_eos: true (vLLM's and inferd's extension): every answer max_tokens long.",
        ),
    ] = False,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 0.0,
    no_cold: Annotated[
        bool,
        typer.Option(
            "--no-cold",
            help="Send prompts as they are; by default each opens with a marker "
            "unique to the run and request, so no prefix cache has seen it.",
        ),
    ] = False,
    slo_ttft_ms: Annotated[
        float | None,
        typer.Option("--slo-ttft-ms", min=0.0, help="Goodput: time to first token at most this."),
    ] = None,
    slo_itl_ms: Annotated[
        float | None,
        typer.Option(
            "--slo-itl-ms", min=0.0, help="Goodput: a request's mean gap between content deltas at most this."
        ),
    ] = None,
) -> None:
    """Streamed POST /v1/chat/completions: output tok/s, TTFT, ITL, end-to-end latency, goodput."""
    from inferd.bench.load import Settings

    settings = Settings(
        kind="chat", url=url, api="openai", model=model, concurrency=_levels(concurrency), requests=requests,
        warmup=warmup, timeout_s=timeout, max_tokens=max_tokens, ignore_eos=ignore_eos, temperature=temperature,
        cold=not no_cold, slo_ttft_ms=slo_ttft_ms, slo_itl_ms=slo_itl_ms,
        prompts_file=str(prompts) if prompts else None,
    )  # fmt: skip
    _run(ctx, settings, api_key, json_path)


@bench_app.command("embed")
def embed(
    ctx: typer.Context,
    url: UrlOption = DEFAULT_URL,
    api: Annotated[
        str, typer.Option("--api", help="openai: POST /v1/embeddings; tei: POST /embed.")
    ] = "openai",
    model: ModelOption = None,
    api_key: ApiKeyOption = None,
    concurrency: ConcurrencyOption = "1,8,32",
    requests: RequestsOption = None,
    warmup: WarmupOption = 2,
    timeout: TimeoutOption = 600.0,
    json_path: JsonOption = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Texts per request.")] = 1,
    texts: TextsOption = None,
) -> None:
    """Embeddings: passages/s and request latency."""
    from inferd.bench.load import Settings

    _choose(api, ("openai", "tei"), "--api")
    settings = Settings(
        kind="embed", url=url, api=api, model=model, concurrency=_levels(concurrency), requests=requests,
        warmup=warmup, timeout_s=timeout, batch=batch, texts_file=str(texts) if texts else None,
    )  # fmt: skip
    _run(ctx, settings, api_key, json_path)


@bench_app.command("rerank")
def rerank(
    ctx: typer.Context,
    url: UrlOption = DEFAULT_URL,
    api: Annotated[str, typer.Option("--api", help="cohere: POST /v1/rerank; tei: POST /rerank.")] = "cohere",
    model: ModelOption = None,
    api_key: ApiKeyOption = None,
    concurrency: ConcurrencyOption = "1,8,32",
    requests: RequestsOption = None,
    warmup: WarmupOption = 2,
    timeout: TimeoutOption = 600.0,
    json_path: JsonOption = None,
    documents: Annotated[int, typer.Option("--documents", min=1, help="Documents ranked per query.")] = 16,
    top_n: Annotated[
        int | None,
        typer.Option("--top-n", min=1, help="cohere: top_n of each request (default: every document)."),
    ] = None,
    texts: TextsOption = None,
    queries: Annotated[
        Path | None,
        typer.Option(
            "--queries", help="Queries, one per line (default: 16 built-in).", exists=True, dir_okay=False
        ),
    ] = None,
) -> None:
    """Rerank: query-document pairs/s, queries/s and request latency."""
    from inferd.bench.load import Settings

    _choose(api, ("cohere", "tei"), "--api")
    settings = Settings(
        kind="rerank", url=url, api=api, model=model, concurrency=_levels(concurrency), requests=requests,
        warmup=warmup, timeout_s=timeout, documents=documents, top_n=top_n,
        texts_file=str(texts) if texts else None, queries_file=str(queries) if queries else None,
    )  # fmt: skip
    _run(ctx, settings, api_key, json_path)


@bench_app.command("render")
def render(
    path: Annotated[Path, typer.Argument(help="A report written by --json.", exists=True, dir_okay=False)],
    slo_ttft_ms: Annotated[
        float | None,
        typer.Option("--slo-ttft-ms", min=0.0, help="Goodput under this TTFT SLO instead of the run's."),
    ] = None,
    slo_itl_ms: Annotated[
        float | None,
        typer.Option("--slo-itl-ms", min=0.0, help="Goodput under this ITL SLO instead of the run's."),
    ] = None,
) -> None:
    """Print the table of a --json report again, recomputed from its raw samples."""
    from inferd.bench import report as reports

    try:
        report = reports.load(path)
        reports.render(report, reports.console(), slo_ttft_ms, slo_itl_ms)
    except (ValueError, KeyError, TypeError) as exc:
        raise fail(f"{path}: cannot render: {exc}", 2) from None


def _run(ctx: typer.Context, settings, api_key: str | None, json_path: Path | None) -> None:
    import asyncio

    from inferd.bench import report as reports
    from inferd.bench.load import BenchError, run

    try:
        report = asyncio.run(run(settings, first_key(api_key), command_line(ctx)))
    except (BenchError, ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None
    reports.add_summaries(report)
    if json_path is not None:
        reports.write(report, json_path)
    reports.render(report, reports.console())
    if json_path is not None:
        typer.echo(f"report: {json_path}", err=True)
    if reports.total_ok(report) == 0:
        raise typer.Exit(1)


def command_line(ctx: typer.Context) -> str:
    """The command as it would be typed again: every option not left at its default (its value
    from the command line or the environment), the API key left out."""
    words = ["inferd", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        if param.name in ("api_key",) or not param.opts:
            continue
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        value = ctx.params.get(param.name)
        if getattr(param, "is_flag", False):
            if value:
                words.append(param.opts[0])
            continue
        if value is not None:
            words += [param.opts[0], str(value)]
    return shlex.join(words)


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or any(c < 1 for c in levels):
        raise typer.BadParameter(
            f"{text!r}: give positive integers separated by commas, e.g. 1,8,32", param_hint="--concurrency"
        )
    return levels


def _choose(value: str, allowed: tuple[str, ...], flag: str) -> None:
    if value not in allowed:
        raise typer.BadParameter(f"{value!r}: one of {', '.join(allowed)}", param_hint=flag)
