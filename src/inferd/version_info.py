"""What ``/version`` and ``inferd version --json`` report."""

from __future__ import annotations

from inferd import __version__


def version_info() -> dict:
    """The package version and the native kernel build this CPU runs (None: the torch paths, or a
    source tree whose kernels are compiled on first use)."""
    from inferd.llm.runner.kernels import best_prebuilt  # imports torch: only when asked

    best = best_prebuilt()
    return {"version": __version__, "kernels": best.name if best is not None else None}
