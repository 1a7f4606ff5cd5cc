"""``inferd pull / list (ls) / show / rm``: the models on this machine."""

from __future__ import annotations

import json
import logging
from typing import Annotated

import typer

from inferd.errors import InferdError

CacheDirOption = Annotated[
    str | None,
    typer.Option("--cache-dir", help="inferd's cache directory (env INFERD_CACHE_DIR; default ~/.cache/inferd)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg="red", err=True)
    return typer.Exit(code)


def cache_dir_setting(flag: str | None) -> str | None:
    """The flag, else INFERD_CACHE_DIR (through the settings, the only reader of the environment)."""
    from inferd.config.settings import load_settings

    try:
        return load_settings({"cache_dir": flag}).cache_dir
    except ValueError as exc:
        raise fail(str(exc), 2) from None


def pull(
    model: Annotated[str, typer.Argument(help="ORG/NAME[@REV], ORG/NAME:FILE.gguf or :QUANT, modelscope:ORG/NAME, or a local path.")],
    include: Annotated[list[str] | None, typer.Option("--include", help="Only files matching this glob (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Skip files matching this glob (repeatable).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Register a local path under this name.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    cache_dir: CacheDirOption = None,
) -> None:
    """Download a model (or register a local folder in place) so `serve --model` can use its name."""
    from inferd.hub.download import pull as pull_model
    from inferd.hub.names import Origin, parse_model_name

    try:
        ref = parse_model_name(model)
        if ref.origin is Origin.BUNDLED:
            typer.echo(f"{ref.name} is bundled with inferd; nothing to pull")
            return
        entry = pull_model(
            ref, cache_dir=cache_dir_setting(cache_dir), include=include,
            exclude=exclude, show_progress=not quiet, name=name,
        )  # fmt: skip
    except InferdError as exc:
        raise fail(exc.message) from None
    except KeyboardInterrupt:
        raise fail("interrupted; nothing was registered (finished files stay cached for the next pull)", 130) from None
    typer.echo(f"{entry.name}: {entry.kind} model at {entry.path}")


def list_models(json_output: JsonOption = False, cache_dir: CacheDirOption = None) -> None:
    """Every local model: bundled, pulled and registered."""
    from inferd.hub.catalog import local_models

    rows = local_models(cache_dir_setting(cache_dir))
    if json_output:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "kind", "architecture", "params", "dtype", "size", "origin", "path")
    for row in rows:
        table.add_row(
            row["name"], row["kind"], row["architecture"], _count(row["num_params"]), row["dtype"] or "",
            _size(row["size_bytes"]), row["origin"], row["path"],
        )  # fmt: skip
    Console().print(table)


def show(
    model: Annotated[str, typer.Argument(help="A name from `inferd list`, a path, or a cached hub id.")],
    json_output: JsonOption = False,
    cache_dir: CacheDirOption = None,
) -> None:
    """A model's architecture, shape, context, vocabulary, chat template, pooling and files."""
    from inferd.hub.catalog import describe_model

    try:
        facts = describe_model(model, cache_dir_setting(cache_dir))
    except InferdError as exc:
        raise fail(exc.message) from None
    if json_output:
        typer.echo(json.dumps(facts, indent=1))
        return
    files = facts.pop("files")
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        typer.echo(f"{key:<{width}}  {value}")
    typer.echo("files")
    for name, size in files:
        typer.echo(f"  {name}  {_size(size)}")


def rm(
    model: Annotated[str, typer.Argument(help="A name from `inferd list`.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    cache_dir: CacheDirOption = None,
) -> None:
    """Remove a pulled model's files, or only the registration of a local folder."""
    from inferd.hub.registry import ModelRegistry
    from inferd.hub.remove import remove_model_files

    folder = cache_dir_setting(cache_dir)
    registry = ModelRegistry(folder)
    try:
        entry = registry.get(model)
        if entry is None:
            raise fail(_not_registered(model))
        what = f"delete the files of {entry.name} ({entry.path})" if entry.owned else f"forget {entry.name} (its folder stays)"
        if not yes and not typer.confirm(f"{what}?", default=False):
            raise fail("cancelled")
        if entry.owned:  # refuses, deleting nothing, a path outside the model's download folder
            remove_model_files(entry, registry.entries(), folder)
        registry.remove(entry.name)
    except InferdError as exc:
        raise fail(exc.message) from None
    typer.echo(f"removed {entry.name}")


def _not_registered(model: str) -> str:
    from inferd.hub.bundled import BUNDLED_MODELS

    if model.lower() in BUNDLED_MODELS:
        package = BUNDLED_MODELS[model.lower()].package.replace("_", "-")
        return f"{model} is bundled with inferd; uninstall it with pip uninstall {package}"
    return f"{model} is not a pulled or registered model (see inferd list)"


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"


def _count(num: int | None) -> str:
    if not num:
        return ""
    return f"{num / 1e9:.2f}B" if num >= 1e9 else f"{num / 1e6:.1f}M"


def register(app: typer.Typer) -> None:
    app.command("pull")(pull)
    app.command("list")(list_models)
    app.command("ls", help="Alias of list.")(list_models)
    app.command("show")(show)
    app.command("rm")(rm)



def prepare_to_serve(settings, check_only: bool) -> None:
    """Before `serve` loads anything: pull missing models (--pull), then plan memory. Exits 1 when a
    model cannot be found, 2 (with the numbers and the flags that would fit) when they do not fit,
    and 0 after printing the plan under --check."""
    from inferd.memory.plan import describe
    from inferd.memory.server import MemoryPlanError, plan_server

    try:
        if settings.pull:
            pull_missing(settings)
        plans = plan_server(settings)
    except InferdError as exc:
        raise fail(exc.message) from None
    if not all(plan.fits for plan in plans):
        raise fail(MemoryPlanError(plans).message, 2)
    if check_only:
        typer.echo("\n".join(describe(plans)))
        raise typer.Exit(0)


def pull_missing(settings) -> None:
    """Pull every --model that is not on this machine yet (what `serve --pull` does first)."""
    from inferd.hub.download import pull as pull_model
    from inferd.hub.names import parse_model_name
    from inferd.hub.resolve import locate_model

    for spec in settings.model:
        try:
            locate_model(spec.source, settings.cache_dir)
        except InferdError:
            logging.getLogger("inferd.models").info("pulling %s", spec.source)
            # Bars are for people reading a terminal; JSON logs get the log lines alone.
            show_progress = settings.log_format == "text"
            pull_model(parse_model_name(spec.source), cache_dir=settings.cache_dir, show_progress=show_progress)
