"""``inferd serve``: its options are generated from ServerSettings, the one declaration of each setting."""

from __future__ import annotations

import inspect
import signal
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import typer
from pydantic import ValidationError

from inferd.config.settings import DEFAULT_MODELS, ENV_PREFIX, ServerSettings, load_settings

HELP = (
    "Serve models over HTTP. Every option can also be set by its INFERD_* variable or in the "
    "YAML file given with --config; flags win over variables, which win over the file."
)


def serve_command():
    """A typer command whose parameters mirror ServerSettings' fields."""
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None,
                typer.Option("--config", help="YAML file of settings (keys as below, snake_case)."),
            ],
        ),
        inspect.Parameter(
            "check",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[
                bool,
                typer.Option(
                    "--check", help="Validate the settings and print the memory plan without loading weights."
                ),
            ],
        ),
    ]
    for name, field in ServerSettings.model_fields.items():
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[
                    _cli_type(field.annotation),
                    typer.Option(
                        _flag(name, field.annotation),
                        help=f"{field.description} (env {ENV_PREFIX}{name.upper()}; default {_default(name)})",
                        show_default=False,
                    ),
                ],
            )
        )

    def serve(**options: Any) -> None:
        config_file = options.pop("config")
        check_only = options.pop("check")
        if options.get("model") == []:
            options["model"] = None
        try:
            settings = load_settings(options, config_file)
        except (ValidationError, ValueError) as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(2) from None
        from inferd.api.logs import configure_logging
        from inferd.cli.models import prepare_to_serve

        # Before pulling: what --pull says goes through the configured log format too.
        configure_logging(settings.log_level, settings.log_format)
        prepare_to_serve(settings, check_only)  # pulls (--pull), plans memory; exits on --check or refusal
        run(settings)

    serve.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return serve


def _default(name: str) -> str:
    if name == "model":
        return " ".join(DEFAULT_MODELS)
    return str(ServerSettings.model_fields[name].get_default(call_default_factory=True))


def _flag(name: str, annotation: Any) -> str:
    """``--name``; a boolean setting gets ``--name/--no-name``, so a default of true can be turned off."""
    flag = "--" + name.replace("_", "-")
    return f"{flag}/--no-{flag[2:]}" if annotation is bool else flag


def _cli_type(annotation: Any) -> Any:
    """The type typer parses: model specs stay strings (settings parse them), Literals become str."""
    origin = get_origin(annotation)
    if origin is list:
        return list[str] | None
    if origin is not None and str(origin).endswith("Literal"):
        return str | None
    args = [a for a in get_args(annotation) if a is not type(None)]
    if args:  # Optional[X]
        return _cli_type(args[0])
    return annotation | None


def run(settings: ServerSettings) -> None:
    from inferd.api.app import create_app
    from inferd.api.logs import configure_logging
    from inferd.api.server import build_server

    configure_logging(settings.log_level, settings.log_format)
    _quiet_libraries()
    if uses_ray(settings):
        _run_on_ray(settings)
        return
    try:
        app = create_app(settings)
    except ValueError as exc:  # an unreadable key file, tracing without its packages
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; a drained stop should exit 0.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, _exit_cleanly)
    build_server(app, settings).run()


def uses_ray(settings: ServerSettings) -> bool:
    """Several replicas, a cluster to join, or room to autoscale: inferd runs on Ray Serve."""
    return settings.replicas > 1 or bool(settings.ray_address) or (settings.max_replicas or 1) > settings.replicas


def _run_on_ray(settings: ServerSettings) -> None:
    """Scale out on Ray Serve; Ray is an optional extra, imported only here."""
    try:
        from inferd.scale.ray_serve import serve_on_ray
    except ImportError:
        typer.secho(
            "error: --replicas above 1, --max-replicas and --ray-address need: pip install 'inferd[ray]'",
            fg="red",
            err=True,
        )
        raise typer.Exit(2) from None
    try:
        serve_on_ray(settings)
    except ValueError as exc:  # more CPUs asked for than the cluster offers
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
