"""The server's plan: every configured model's needs, from its files, against each device's budget.

Runs before any weight is loaded (``serve --check`` prints it; ``serve`` refuses with it). The
same weights served under two names are counted once, as the model table loads them once.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from inferd.config import ModelSpec, ServerSettings
from inferd.config.model_spec import ModelKind
from inferd.errors import ModelLoadError
from inferd.hub.gguf import conversion_folder, is_converted, read_gguf_info
from inferd.hub.inspect import inspect_model, packs_unpadded
from inferd.hub.resolve import is_causal_lm, resolve_model
from inferd.memory.estimate import (
    RUNTIME_BYTES,
    ModelShape,
    count_parameters,
    encoder_activation_bytes,
    encoder_weight_bytes,
    int8_weight_bytes,
    kv_bytes_per_token,
    llm_activation_bytes,
    shape_from_config,
    weight_bytes,
)
from inferd.memory.plan import KVPolicy, MemoryPlan, ModelNeed, describe, plan_memory
from inferd.memory.profile import free_memory


class MemoryPlanError(ModelLoadError):
    """The configured models do not fit the memory budget; the message says what would."""

    def __init__(self, plans: tuple[MemoryPlan, ...]) -> None:
        problems = [p for plan in plans for p in plan.problems]
        super().__init__("\n".join(["the models do not fit in memory:", *problems, "", *describe(plans)]))
        self.plans = plans


def kv_policy(settings: ServerSettings) -> KVPolicy:
    return KVPolicy(
        kv_cache_memory=settings.kv_cache_memory,
        kv_cache_fraction=settings.kv_cache_fraction,
        # Only rounds the plan's KV figures; the engine sizes its blocks with the device's own size.
        block_size=settings.block_size or 16,
        max_num_seqs=settings.max_num_seqs,
    )


def plan_server(settings: ServerSettings, budgets: dict[str, int] | None = None) -> tuple[MemoryPlan, ...]:
    """Plans for every device the settings use; ``budgets`` defaults to --memory-budget or what is free."""
    needs = server_needs(settings)
    if budgets is None:
        devices = dict.fromkeys(n.device for n in needs)
        budgets = {d: settings.memory_budget or free_memory(d) for d in devices}
    return plan_memory(needs, budgets, kv_policy(settings))


def check_plans(plans: tuple[MemoryPlan, ...]) -> None:
    if not all(plan.fits for plan in plans):
        raise MemoryPlanError(plans)


def server_needs(settings: ServerSettings) -> list[ModelNeed]:
    """One need per distinct loaded model, in the order of --model."""
    needs: dict[tuple, ModelNeed] = {}
    for spec in settings.model:
        resolved = resolve_model(spec.source, spec.kind, cache_dir=settings.cache_dir)
        need = model_need(spec, settings, resolved.path)
        # A causal LM served as chat and as a reranker runs on two engines (the model table's key).
        served = resolved.kind if need.is_llm else None
        key = (resolved.path, need.is_llm, served, need.device, need.dtype)
        needs[key] = replace(needs[key], name=f"{needs[key].name}, {need.name}") if key in needs else need
    return list(needs.values())


def model_need(spec: ModelSpec, settings: ServerSettings, path: Path) -> ModelNeed:
    """What serving ``spec`` (its files at ``path``) needs, read from its files without loading it."""
    files = inspect_model(path)
    shape = shape_from_config(files.config)
    num_params = files.num_params or count_parameters(shape)
    if is_causal_lm(path):  # chat, or an LLM reranker: the LLM engine either way
        # The server's own int8 choices are decided at load, and what it serves where they do not
        # hold is the model's precision: planned as that (int8 only ever needs less).
        config = settings.llm_config(spec).fallback()
        need = _llm_need(spec.served_name, shape, num_params, config)
        if files.is_gguf:
            need = replace(need, load_peak_bytes=_conversion_peak(path, config))
        return need
    packed = files.kind is ModelKind.EMBEDDING and packs_unpadded(files.config)
    return _encoder_need(spec.served_name, path, shape, num_params, settings.encoder_config(spec), packed)


def _llm_need(name: str, shape: ModelShape, num_params: int, config) -> ModelNeed:
    context = shape.max_position_embeddings
    return ModelNeed(
        name=name,
        device=config.device,
        dtype=config.dtype,
        weight_bytes=(
            int8_weight_bytes(shape, num_params, config.dtype)
            if config.quantization == "int8"
            else weight_bytes(num_params, config.dtype)
        ),
        activation_bytes=llm_activation_bytes(
            shape, config.max_num_batched_tokens, config.max_num_seqs, config.dtype
        ),
        runtime_bytes=RUNTIME_BYTES["cuda" if config.device.startswith("cuda") else "cpu"],
        kv_bytes_per_token=kv_bytes_per_token(shape, config.cache_dtype),
        max_model_len=min(config.max_model_len or context, context),
    )


def _conversion_peak(gguf_path: Path, config) -> int:
    """What converting the GGUF file at start holds at its peak; 0 when a conversion is cached."""
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    if is_converted(conversion_folder(gguf_path, config.dtype, cache_dir)):
        return 0
    return read_gguf_info(gguf_path).conversion(config.dtype).peak_bytes


def _encoder_need(
    name: str, path: Path, shape: ModelShape, num_params: int, config, packed_bert: bool
) -> ModelNeed:
    # A checked dtype is decided at load, on the float32 model, which is what it serves on a failed
    # check: its bytes are planned as float32 (its dtype stays what it may serve: the load's key).
    planned = "float32" if config.dtype_gate else config.dtype
    return ModelNeed(
        name=name,
        device=config.device,
        dtype=config.dtype,
        weight_bytes=encoder_weight_bytes(shape, num_params, planned, packed_bert),
        activation_bytes=encoder_activation_bytes(
            shape, config.max_batch_tokens, _encoder_max_len(path, shape), planned
        ),
        runtime_bytes=RUNTIME_BYTES["cuda" if config.device.startswith("cuda") else "cpu"],
    )


def _encoder_max_len(path: Path, shape: ModelShape) -> int:
    """sentence-transformers' max_seq_length when present, else the position table."""
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        try:
            limit = json.loads(st_config.read_text()).get("max_seq_length")
        except json.JSONDecodeError:
            limit = None
        if limit:
            return min(int(limit), shape.max_position_embeddings)
    return shape.max_position_embeddings
