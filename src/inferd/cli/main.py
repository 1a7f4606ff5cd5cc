"""``inferd``: the command-line entry point."""

from __future__ import annotations

import json
import os
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


# OpenMP workers spin this many iterations after a parallel region before sleeping (libgomp's
# default is 300,000, ~0.1 ms+). The engine loop, the event loop and the encoders share few cores
# with torch's workers; long spinning steals them. Measured with benchmarks/llm_bench.py on 2
# cores: 1.3x output tok/s at 8 streams and 15% lower single-stream ITL. libgomp reads it when torch
# loads it, so it is set here, before anything imports torch; a value the user set wins.
OMP_SPIN_ENV = {"GOMP_SPINCOUNT": "10000"}


def main() -> None:
    for name, value in OMP_SPIN_ENV.items():
        os.environ.setdefault(name, value)
    app()
