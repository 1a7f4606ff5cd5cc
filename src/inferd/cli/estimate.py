"""``inferd estimate``: what a model needs in memory, from config.json alone, and whether it fits here."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from inferd.cli.models import CacheDirOption, JsonOption, cache_dir_setting, fail
from inferd.errors import InferdError


def estimate(
    model: Annotated[str, typer.Argument(help="A local path, bundled or registered name, or a hub id (only config.json is fetched).")],
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32, bfloat16, float16, int8, int4; default: as stored.")] = None,
    context: Annotated[int | None, typer.Option("--context", min=1, help="Tokens per sequence; default: the model's context length.")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Sequences at once.")] = 1,
    kv_dtype: Annotated[str | None, typer.Option("--kv-dtype", help="KV cache dtype; default: --dtype.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (cuda:N): whose free memory to compare with.")] = "cpu",
    json_output: JsonOption = False,
    cache_dir: CacheDirOption = None,
) -> None:
    """Weights, KV cache, activations and total for context × batch, and the largest that fits here."""
    from inferd.memory.report import estimate_report

    if not (device == "cpu" or device.startswith("cuda")):
        raise fail(f"--device must be cpu or cuda, not {device!r}", 2)
    try:
        report = estimate_report(
            model, dtype=dtype, context=context, batch=batch, kv_dtype=kv_dtype, device=device,
            cache_dir=cache_dir_setting(cache_dir),
        )  # fmt: skip
    except InferdError as exc:
        raise fail(exc.message) from None
    if json_output:
        typer.echo(json.dumps(report, indent=1))
    else:
        _print_table(report)


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']} ({report['architecture']})", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    table.add_row("parameters", f"{report['num_params']:,} (from {report['params_from']})")
    table.add_row(f"weights ({report['weights_as']})", _both(report["weight_bytes"]))
    if report["gguf_file_bytes"] is not None:
        table.add_row("  GGUF file, as stored", _both(report["gguf_file_bytes"]))
        how = "tensor by tensor" if report["conversion_tensor_by_tensor"] else "whole, by transformers"
        done = " (done: reused)" if report["conversion_done"] else ""
        table.add_row(f"  conversion into {report['conversion_dtype']}, once{done}", how)
        table.add_row("    peak RAM, before the KV cache", _both(report["conversion_peak_bytes"]))
        table.add_row("    converted copy on disk", _both(report["conversion_disk_bytes"]))
    table.add_row(f"KV cache per token ({report['kv_dtype']})", f"{report['kv_bytes_per_token']:,} B")
    table.add_row(f"KV cache for {report['context']} × {report['batch']}", _both(report["kv_cache_bytes"]))
    if report["naive_kv_cache_bytes"] != report["kv_cache_bytes"]:
        table.add_row("  (2 × layers × hidden formula would say)", _both(report["naive_kv_cache_bytes"]))
    table.add_row("activations", _both(report["activation_bytes"]))
    table.add_row("runtime", _both(report["runtime_bytes"]))
    table.add_row("total", _both(report["total_bytes"]))
    table.add_row(f"free on {report['device']}", _both(report["free_bytes"]))
    table.add_row("fits", "yes" if report["fits"] else "NO")
    if report["kv_bytes_per_token"]:
        table.add_row(f"largest context at batch {report['batch']}", f"{report['max_context_at_batch']:,}")
        table.add_row(f"largest batch at context {report['context']}", f"{report['max_batch_at_context']:,}")
    Console().print(table)


def _both(num_bytes: int) -> str:
    """Decimal GB (as model cards quote them) and binary GiB."""
    return f"{num_bytes / 1e9:,.2f} GB  {num_bytes / 2**30:,.2f} GiB"
