"""What ``/version`` and ``inferd version --json`` report."""

from __future__ import annotations

from inferd import __version__


def version_info() -> dict:
    """The package version and the native kernel build this CPU runs (None: no build loads here,
    and the LLM runs on its torch paths)."""
    from inferd.llm.runner.kernels import native_ops  # imports torch: only when asked

    ops = native_ops()  # the library a server loaded already; loading it is cheap otherwise
    return {"version": __version__, "kernels": ops.variant if ops is not None else None}
