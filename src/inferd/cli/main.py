"""``inferd``: the command-line entry point."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from inferd import __version__
from inferd.cli import bench, client, estimate, models, serve

app = typer.Typer(
    name="inferd",
    help="Serve chat LLMs, text embeddings and rerankers behind OpenAI-, TEI- and Cohere-compatible APIs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("serve", help=serve.HELP)(serve.serve_command())
models.register(app)
client.register(app)
bench.register(app)
app.command("estimate")(estimate.estimate)


@app.command("version")
def version(
    as_json: Annotated[bool, typer.Option("--json", help="Also the native kernel build this CPU runs.")] = False,
) -> None:
    """Print inferd's version."""
    if not as_json:
        typer.echo(__version__)
        return
    from inferd.version_info import version_info

    typer.echo(json.dumps(version_info()))


@app.command("settings")
def settings(markdown: bool = typer.Option(False, "--markdown", help="Print the table as Markdown.")) -> None:
    """List every server setting with its flag, environment variable and default."""
    from inferd.config.settings import settings_markdown

    text = settings_markdown()
    if markdown:
        typer.echo(text, nl=False)
        return
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(text))


def main() -> None:
    # OpenMP workers keep libgomp's own spin before sleeping at a barrier (300,000 iterations).
    # Serve shortened it to 10,000 while the forward was many torch ops with Python between them.
    # Now that a step's layers run in one native call, on 2 cores (benchmarks/RESULTS.md,
    # 2026-12-04): served on a quiet machine the two are mostly within run-to-run noise; beside a
    # process busy 12 % of one core the default served chat up to 22 % more tok/s (int8, 32
    # streams) with a lower ITL p95 at every load in two runs. The engine alone
    # (benchmarks/engine_bench.py) is the same with either: the spin decides how the server's
    # own threads and the engine's workers share the cores.
    app()
