"""Shared by the kernel tests: run a test once per native linear kernel this CPU has."""

from contextlib import contextmanager

import pytest

LINEAR_KERNELS = ["amx", "avx512-bf16"]


@contextmanager
def linear_kernel_selected(ops, name: str):
    """``ops.linear`` through kernel ``name`` for the block (skipped where it is not built), then
    back to the default choice."""
    if ops is None or not ops.use_linear_kernel(name == "amx"):
        pytest.skip(f"no {name} linear kernel here")
    try:
        yield name
    finally:
        ops.use_linear_kernel(ops.amx)
