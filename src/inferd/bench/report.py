"""The JSON report and the table printed from it.

A report holds the command line, the settings, every level's raw samples and its summary. The table
is always drawn from summaries recomputed from the samples (``summarise``), by the run and by
``inferd bench render`` alike, so both print the same table; render may apply other SLOs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from inferd.bench import REPORT_FORMAT, stats

if TYPE_CHECKING:
    from rich.console import Console

NO_VALUE = "–"
TABLE_WIDTH = 160  # when stdout is not a terminal (a file, a pipe, a test): no wrapped columns


def new_report(settings: dict, command: str, model: str | None, run_id: str) -> dict:
    from inferd.bench.load import ROUTES

    return {
        "format": REPORT_FORMAT,
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kind": settings["kind"],
        "route": ROUTES[(settings["kind"], settings["api"])],
        "model": model,
        "run_id": run_id,
        "settings": settings,
        "warmup": None,
        "levels": [],
    }


def summarise(
    report: dict, level: dict, slo_ttft_ms: float | None = None, slo_itl_ms: float | None = None
) -> dict:
    """A level's figures from its samples; the SLOs default to the run's own."""
    s = report["settings"]
    if report["kind"] == "chat":
        return stats.chat_summary(
            level,
            max_tokens=s.get("max_tokens"),
            slo_ttft_ms=s.get("slo_ttft_ms") if slo_ttft_ms is None else slo_ttft_ms,
            slo_itl_ms=s.get("slo_itl_ms") if slo_itl_ms is None else slo_itl_ms,
        )
    if report["kind"] == "embed":
        return stats.embed_summary(level)
    return stats.rerank_summary(level)


def add_summaries(report: dict) -> dict:
    for level in report["levels"]:
        level["summary"] = summarise(report, level)
    return report


def total_ok(report: dict) -> int:
    return sum(1 for level in report["levels"] for s in level["samples"] if s["error"] is None)


def write(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, separators=(",", ":")) + "\n", encoding="utf-8")


def load(path: Path) -> dict:
    report = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ValueError(f"{path}: not an inferd bench report ({REPORT_FORMAT})")
    return report


def console() -> Console:
    from rich.console import Console

    out = Console(highlight=False)
    return out if out.is_terminal else Console(highlight=False, width=TABLE_WIDTH)


def render(
    report: dict, out: Console, slo_ttft_ms: float | None = None, slo_itl_ms: float | None = None
) -> None:
    """The header, one table row per level, then the first errors and warnings of each level."""
    from rich.table import Table

    summaries = [summarise(report, level, slo_ttft_ms, slo_itl_ms) for level in report["levels"]]
    for line in header(report, summaries):
        out.print(line, markup=False, soft_wrap=True)
    kind = report["kind"]
    columns, rows = _TABLES[kind](report, summaries)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in columns:
        table.add_column(name, justify="right")  # wraps only where the console is too narrow
    for row in rows:
        table.add_row(*row)
    out.print(table)
    for line in notes(report, summaries):
        out.print(line, markup=False, soft_wrap=True)


def header(report: dict, summaries: list[dict]) -> list[str]:
    s = report["settings"]
    kind = report["kind"]
    lines = [
        f"inferd bench {kind}: {s['url'].rstrip('/')} {report['route']} ({s['api']}), model "
        f"{report['model'] or NO_VALUE}, started {report['started']}"
    ]
    if kind == "chat":
        parts = [f"max_tokens {s['max_tokens'] if s['max_tokens'] is not None else 'unset'}"]
        if s["ignore_eos"]:
            parts.append("ignore_eos")
        if s["temperature"] is not None:
            parts.append(f"temperature {s['temperature']:g}")
        parts.append(f"prompts {s['prompts_file'] or 'built-in'}")
        parts.append(f"cold (run {report['run_id']})" if s["cold"] else "not cold (--no-cold)")
        slos = summaries[0]["goodput"] if summaries else None
        if slos:
            parts.append(
                "SLO "
                + ", ".join(
                    f"{name} <= {value:g} ms"
                    for name, value in (("TTFT", slos["slo_ttft_ms"]), ("ITL", slos["slo_itl_ms"]))
                    if value is not None
                )
            )
    elif kind == "embed":
        parts = [f"batch {s['batch']}", f"texts {s['texts_file'] or 'built-in'}"]
    else:
        parts = [f"documents {s['documents']}"]
        if s["api"] != "tei":
            parts.append(f"top_n {min(s['top_n'] or s['documents'], s['documents'])}")
        parts += [f"texts {s['texts_file'] or 'built-in'}", f"queries {s['queries_file'] or 'built-in'}"]
    warm = report.get("warmup")
    parts.append(f"warm-up {warm['requests']} ({warm['errors']} failed)" if warm else "no warm-up")
    lines.append("; ".join(parts))
    return lines


def notes(report: dict, summaries: list[dict]) -> list[str]:
    out = []
    s = report["settings"]
    for level, summary in zip(report["levels"], summaries):
        label = f"c={level['concurrency']}"
        for e in summary["first_errors"]:
            out.append(f"{label}: {e['count']} x {e['error']}")
        if report["kind"] == "chat" and s["ignore_eos"] and summary["short_answers"]:
            out.append(
                f"{label}: {summary['short_answers']} answers shorter than max_tokens "
                "(was ignore_eos honoured?)"
            )
    return out


def fmt(x: float | None) -> str:
    """Three significant figures or so: 0.123, 1.23, 12.3, 123, 1234."""
    if x is None:
        return NO_VALUE
    if abs(x) < 1:
        return f"{x:.3f}"
    if abs(x) < 10:
        return f"{x:.2f}"
    if abs(x) < 100:
        return f"{x:.1f}"
    return f"{x:.0f}"


def _spread(d: dict) -> str:
    return " / ".join(fmt(d[f"p{q}"]) for q in stats.PERCENTILES)


def _pcts(name: str) -> str:
    return f"{name} ms " + "/".join(f"p{q}" for q in stats.PERCENTILES)


def _chat_table(report: dict, summaries: list[dict]) -> tuple[list[str], list[list[str]]]:
    slo = bool(summaries and summaries[0]["goodput"])
    columns = [
        "conc",
        "requests",
        "errors",
        "wall s",
        "req/s",
        "out tok/s",
        _pcts("TTFT"),
        _pcts("ITL"),
        _pcts("e2e"),
    ]
    if slo:
        columns.append("goodput (share, tok/s)")
    rows = []
    for level, m in zip(report["levels"], summaries):
        row = [
            str(level["concurrency"]),
            str(m["requests"]),
            str(m["errors"]),
            fmt(m["wall_s"]),
            fmt(m["requests_per_s"]),
            fmt(m["output_tokens_per_s"]),
            _spread(m["ttft_ms"]),
            _spread(m["itl_ms"]),
            _spread(m["e2e_ms"]),
        ]
        if slo:
            g = m["goodput"]
            share = NO_VALUE if g["share"] is None else f"{g['share'] * 100:.0f}%"
            row.append(f"{share}, {fmt(g['output_tokens_per_s'])}")
        rows.append(row)
    return columns, rows


def _encoder_table(
    report: dict, summaries: list[dict], names: tuple[str, str, str, str], key: str, rates: tuple[str, str]
) -> tuple[list[str], list[list[str]]]:
    """An embed or rerank level per row. ``names``: the columns of the items per request (its value
    from settings[``key``]), the requests, and the two rates (summary keys ``rates``)."""
    size, requests, request_rate, item_rate = names
    columns = ["conc", size, requests, "errors", "wall s", request_rate, item_rate, _pcts("latency")]
    rows = [
        [
            str(level["concurrency"]),
            str(report["settings"][key]),
            str(m["requests"]),
            str(m["errors"]),
            fmt(m["wall_s"]),
            fmt(m[rates[0]]),
            fmt(m[rates[1]]),
            _spread(m["latency_ms"]),
        ]
        for level, m in zip(report["levels"], summaries)
    ]
    return columns, rows


def _embed_table(report: dict, summaries: list[dict]) -> tuple[list[str], list[list[str]]]:
    names = ("batch", "requests", "req/s", "passages/s")
    return _encoder_table(report, summaries, names, "batch", ("requests_per_s", "passages_per_s"))


def _rerank_table(report: dict, summaries: list[dict]) -> tuple[list[str], list[list[str]]]:
    names = ("docs", "queries", "queries/s", "pairs/s")
    return _encoder_table(report, summaries, names, "documents", ("queries_per_s", "pairs_per_s"))


_TABLES = {"chat": _chat_table, "embed": _embed_table, "rerank": _rerank_table}
