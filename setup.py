"""Builds the native kernel library once per instruction-set level when the package is built (a
wheel, ``pip install .``, or the editable install ``make install`` runs), so the serving machine
needs no compiler. The metadata lives in pyproject.toml; this file only adds the build step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = Path("src/inferd/llm/runner/kernels")
SOURCES = sorted(str(p) for p in KERNELS.glob("*.c"))


def _variants():
    # Loaded from its file: importing the package would import torch, absent at build time.
    spec = importlib.util.spec_from_file_location("_inferd_kernel_variants", KERNELS / "variants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


VARIANTS = _variants()


class BuildKernels(build_ext):
    """Each variant is a plain shared library (loaded with ctypes, not imported), compiled from the
    same sources with its level's flags. A level this compiler cannot target is left out with a
    warning; the server then runs the best one that was built."""

    def build_extension(self, ext: Extension) -> None:
        variant = ext._inferd_variant
        objects_dir = str(Path(self.build_temp) / variant.name)
        for openmp in ([VARIANTS.OPENMP_FLAG], []):  # Apple clang has no -fopenmp: serial loops then
            flags = [*VARIANTS.COMMON_FLAGS, *variant.flags, *openmp]
            try:
                objects = self.compiler.compile(
                    ext.sources, output_dir=objects_dir, extra_postargs=flags, depends=ext.depends
                )
                self.compiler.link_shared_object(
                    objects, self.get_ext_fullpath(ext.name), extra_postargs=[*openmp, "-lm"]
                )
                return
            except Exception as exc:  # noqa: BLE001 - a compiler's refusal, reported below
                error = exc
        # Not fatal, not even for the portable build: an install without a compiler still serves,
        # on the torch paths, and says so at start (a wheel is where the kernels are meant to come from).
        self.warn(f"the {variant.name} kernels were not built ({error}); CPUs with it run a lower level")


def _extension(variant) -> Extension:
    ext = Extension(
        f"inferd.llm.runner.kernels.{variant.stem}",
        sources=SOURCES,
        depends=[str(KERNELS / "common.h")],
        optional=True,
    )
    ext._inferd_variant = variant
    return ext


setup(
    ext_modules=[_extension(v) for v in VARIANTS.variants()],
    cmdclass={"build_ext": BuildKernels},
)
