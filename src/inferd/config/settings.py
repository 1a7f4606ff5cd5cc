"""ServerSettings: the one declaration of every server setting.

Each field yields a command-line flag (``inferd serve --max-batch-tokens``), an environment variable
(``INFERD_MAX_BATCH_TOKENS``), a key of the YAML config file, and a row of the settings table in
docs/OPERATIONS.md (``inferd settings --markdown``). Precedence: flag > variable > file > default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from inferd.config.access import ApiKeySpec, read_key_file
from inferd.config.engine import (
    DEFAULT_CPU_PREFILL_WHILE_DECODING,
    EncoderConfig,
    LLMConfig,
    default_block_size,
)
from inferd.config.model_spec import ModelSpec

ENV_PREFIX = "INFERD_"

# The bundled defaults: the embedder, and the same weights served as a cosine-similarity reranker
# so that every route works offline on a fresh machine.
DEFAULT_MODELS = (
    "smollm2-135m-instruct",
    "all-minilm-l6-v2",
    "all-minilm-l6-v2=all-minilm-l6-v2-rerank,kind=rerank",
)


class ServerSettings(BaseSettings):
    """Settings of ``inferd serve``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    model: Annotated[list[ModelSpec], NoDecode] = Field(
        default_factory=lambda: [ModelSpec.model_validate(s) for s in DEFAULT_MODELS],
        description="Model to serve: SOURCE[=ALIAS][,kind=embedding|rerank|chat][,dtype=..]. SOURCE is a "
        "local folder, a Hugging Face id or a bundled name. Repeat the flag for several models; in "
        "the variable, separate specs with spaces.",
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for every interface).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    replicas: int = Field(
        1,
        ge=1,
        le=1024,
        description="Engine replicas; above 1 inferd runs on Ray Serve (the ray extra): each replica "
        "holds every configured model, behind one ingress that routes by prompt prefix.",
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join (auto, or host:port of its head); set, inferd runs on Ray "
        "even with one replica. Unset: a local Ray cluster is started when replicas is above 1.",
    )
    cpus_per_replica: float = Field(
        1.0,
        gt=0,
        description="CPUs Ray reserves for each replica; also its torch threads unless num_threads "
        "is set. replicas x cpus_per_replica must fit in the cluster's CPUs.",
    )
    ray_routing: Literal["prefix", "power-of-two"] = Field(
        "prefix",
        description="On Ray: prefix sends a chat or completion request to the replica that holds its "
        "prompt's prefix (least-loaded when imbalanced); power-of-two is Ray Serve's default (the "
        "less loaded of two random replicas; /metrics then shows one replica per scrape).",
    )
    max_replicas: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="On Ray: above replicas, Ray Serve autoscales the engine replicas between replicas "
        "and this on queue depth (see autoscale_target).",
    )
    autoscale_target: float | None = Field(
        None,
        gt=0,
        description="On Ray with max_replicas: requests running or queued per replica that Ray Serve "
        "aims for when autoscaling. Unset: max_num_seqs (a replica scales out once its batch is full).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where models run: cuda when available under auto."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weight dtype. auto: float16 for encoders and bfloat16 for chat models on CUDA; "
        "on the CPU bfloat16 where the CPU has native bf16 (AMX or AVX-512 BF16), else float32 - "
        "for an encoder only where its embeddings stay within cosine 0.9999 of float32 (rerankers: "
        "the same rankings) on probe texts checked at load, else float32.",
    )
    num_threads: int | None = Field(
        None, ge=1, description="Torch threads for inference; default: the cores this process may use."
    )
    max_batch_tokens: int = Field(
        16384, ge=1, description="Encoder batch budget in tokens, counted padded (longest × count)."
    )
    max_batch_requests: int = Field(32, ge=1, description="Most inputs in one encoder batch.")
    max_client_batch_size: int = Field(
        2048, ge=1, description="Most inputs (texts, or rerank documents) in one request."
    )
    max_queued_items: int = Field(
        8192, ge=1, description="Encoder queue bound in inputs; past it requests get 429 at once."
    )
    max_input_chars: int = Field(
        16 * 2**20,
        ge=1,
        description="Encoders: most characters one request gives the tokenizer, an embedding prompt "
        "or a rerank query counted once per input; past it 400 before any work.",
    )
    max_num_seqs: int = Field(32, ge=1, description="LLM: most sequences running at once.")
    max_num_batched_tokens: int = Field(
        2048,
        ge=1,
        description="LLM: token budget of one engine step (longer prompts are prefilled in chunks).",
    )
    prefill_tokens_while_decoding: int | None = Field(
        None,
        ge=0,
        description="LLM: while any request decodes, one prompt with more than this many tokens left to "
        "compute (a RAG context, a preempted request's recompute) gets this many an engine step, the "
        "first in line, so that it goes in chunks between the decoders' tokens instead of holding each "
        "of them for its whole prefill; shorter prompts go whole. Default: 512 on the CPU (a chunk of "
        "~150 ms for SmolLM2 on 2 cores: 8 RAG streams' inter-token p95 336-358 -> 157 ms, first token "
        "p50 +16 %), no limit on a GPU; 0: no limit.",
    )
    max_model_len: int | None = Field(
        None, ge=1, description="LLM: context length (prompt + output); default: the model's own."
    )
    block_size: int | None = Field(
        None,
        ge=1,
        description="LLM: tokens per KV-cache block; default: 8 on the CPU (a prefix-cache hit leaves "
        "fewer tokens to compute), 16 on CUDA.",
    )
    kv_cache_memory: int | None = Field(
        None,
        ge=1,
        description="LLM: KV-cache bytes; default: kv_cache_fraction of the memory free after loading.",
    )
    kv_cache_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="LLM: share of free memory given to the KV cache when kv_cache_memory is unset.",
    )
    enable_prefix_caching: bool = Field(
        True, description="LLM: reuse the KV blocks of shared prompt prefixes."
    )
    model_impl: Literal["auto", "transformers"] = Field(
        "auto",
        description="LLM: auto runs llama/mistral/qwen2/qwen3 on inferd's own fused forward and other "
        "architectures on transformers' classes; transformers uses transformers' classes for all.",
    )
    native_kernels: bool = Field(
        True,
        description="LLM: on the CPU, run inferd's C kernels, built with the package for each "
        "instruction-set level and chosen for this CPU (paged attention for decodes and short prefills; "
        "with bf16 also fused element-wise ops and, on CPUs with AMX or AVX-512 BF16, the linear layers "
        "and one call for all layers of a step); off, or without a build, the torch paths run.",
    )
    batch_invariant: bool = Field(
        True,
        description="LLM: where a step runs wholly on the native bf16 kernels, long prompt chunks attend "
        "through the same row kernel as decodes instead of SDPA, so greedy output is the same whether "
        "a request runs alone, chunked, after a prefix-cache hit or in a batch (on AMX CPUs a prompt "
        "chunk over ~220 tokens prefills slower); off, they switch to SDPA where it is faster.",
    )
    speculative_tokens: int | None = Field(
        None,
        ge=0,
        le=16,
        description="LLM: prompt-lookup speculative decoding: up to this many draft tokens per step for "
        "each greedy request, copied from where its last tokens occurred before in its prompt or output, "
        "and verified in the same forward; pays where answers quote their context (RAG). Unset: 4 where "
        "the runner is batch-invariant (bf16 native path), where drafts change no greedy output, else "
        "off; 0: off.",
    )
    speculative_max_running: int = Field(
        8,
        ge=1,
        description="LLM: drafts are proposed only while at most this many requests run (one stream "
        "reads every weight once per step whatever its rows; a full batch pays for every rejected draft).",
    )
    quantization: Literal["auto", "none", "int8"] = Field(
        "auto",
        description="LLM: int8 quantises the weights of inferd's own forward (every linear layer and the "
        "LM head, per output channel) at load and multiplies them with int8 activations (each row "
        "quantised per group of 32 inputs): half the weight bytes a token reads, twice the arithmetic "
        "rate. Needs the CPU, bf16, the native kernels and AVX-512 BF16 with VNNI. auto: int8 where the "
        "model can run it and a probe at load finds the model's perplexity on a fixed text within 1 % "
        "of the unquantised model's (llm/precision.py; the verdict is kept under --cache-dir), else none; "
        "none: the model's own weights.",
    )
    kv_cache_dtype: Literal["auto", "model", "int8"] = Field(
        "auto",
        description="LLM: int8 stores each cached key and value vector in int8 with its own scale (per "
        "token and kv head): a little over half the bytes of bf16, so about twice the context fits and "
        "decode attention reads half as much. Needs the CPU, bf16, the native kernels with AVX-512 BF16 "
        "(or AMX), inferd's own forward without per-head q/k norms (llama, mistral, qwen2), head_dim a "
        "multiple of 32 up to 256 and --block-size a multiple of 8. auto: int8 where the model can run "
        "it and passes the same probe as --quantization auto (both int8 choices are probed together), "
        "else model; model: the model's dtype.",
    )
    max_n: int = Field(16, ge=1, description="LLM: most choices (n) in one request.")
    cache_dir: str | None = Field(
        None, description="Where converted models are kept; default: ~/.cache/inferd."
    )
    # Models and memory: fetching missing models, and the budget the memory planner splits.
    pull: bool = Field(
        False, description="Download models that are not on this machine before loading (as inferd pull)."
    )
    memory_budget: int | None = Field(
        None,
        ge=1,
        description="Bytes the models may use on each device; default: the memory free at start "
        "(RAM, or the GPU's). Serving refuses to start when the models do not fit.",
    )
    models_dir: str | None = Field(
        None,
        description="A folder of models (each a model folder or a GGUF file), servable by their folder or "
        "file name without being loaded at start: the first request for one loads it.",
    )
    serve_registered: bool = Field(
        True,
        description="Models pulled or registered with inferd (inferd list) are servable by name, loaded on "
        "their first request.",
    )
    keep_alive: str = Field(
        "-1",
        description="How long a model stays loaded after its last request: a duration (30s, 5m, 1h), 0 "
        "(unload when idle) or -1 (until memory is needed for another model). A request's keep_alive "
        "(Ollama API) overrides it for that model.",
    )
    pin: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Served model names that are never unloaded to make room or by keep-alive; repeat "
        "the flag for several.",
    )
    max_loaded_models: int = Field(
        0, ge=0, description="Most models loaded at once (0: as many as the memory budget holds)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    # Access, limits, observability and lifecycle (production operation).
    api_key: Annotated[list[ApiKeySpec], NoDecode] = Field(
        default_factory=list,
        description="API key clients must send (Authorization: Bearer KEY, or x-api-key); repeat for "
        "several. In the config file an entry may be a mapping {key, name, models, requests_per_minute, "
        "tokens_per_minute, max_concurrent_requests}. Without keys every route is open.",
    )
    api_key_file: Path | None = Field(None, description="File of API keys, one per line (# comments).")
    public_metrics: bool = Field(False, description="Serve /metrics without a key when keys are set.")
    metrics_names: Literal["inferd", "vllm", "both"] = Field(
        "inferd",
        description="Names of the LLM engine metrics on /metrics: inferd's (inferd:*, label model), vLLM's "
        "(vllm:*, labels model_name and engine, as vLLM dashboards and the Gateway API Inference "
        "Extension's endpoint picker read them), or both. Encoder, model-pool and HTTP metrics keep "
        "inferd's names.",
    )
    requests_per_minute: int | None = Field(
        None, ge=1, description="Requests per minute per key (all clients together without keys)."
    )
    tokens_per_minute: int | None = Field(
        None,
        ge=1,
        description="Prompt + completion tokens per minute per key, reserved at admission (prompt + "
        "max_tokens for each choice) and settled when the request ends.",
    )
    max_queued_requests: int = Field(
        256, ge=1, description="LLM: most requests waiting for a running slot; past it 429 at once."
    )
    max_prompt_chars: int | None = Field(
        None,
        ge=1,
        description="LLM: most characters in one prompt (the rendered chat included), refused with a "
        "400 before it is tokenised; default: 32 per token of the model's context, more than any "
        "prompt that fits it has in practice (text runs 3-5 characters a token).",
    )
    share_prefix_cache: bool = Field(
        False,
        description="LLM: with API keys, let the requests of different keys reuse each other's cached "
        "prompt prefixes (single-tenant deployments). By default each key's prefixes are its own: a "
        "cache hit (cached_tokens, time to first token) would tell one tenant another's prompt.",
    )
    max_buffered_outputs: int = Field(
        1024,
        ge=1,
        description="LLM: most outputs (one per generated token) a request may have waiting for its "
        "client to read; a client that falls further behind is cut with an error (408) and its "
        "request aborted, so a stream nobody reads holds a bounded buffer.",
    )
    max_request_bytes: int = Field(
        16 * 2**20, ge=1, description="Largest request body in bytes; larger bodies get 413."
    )
    request_timeout: float | None = Field(
        600.0,
        ge=0,
        description="Seconds a request may take, streams included, before it is aborted (a stream ends "
        "with an error event and [DONE]); 0 turns it off. Ten minutes lets a long generation finish "
        "while a request that waits forever still lets go of its slot.",
    )
    max_concurrent_requests: int | None = Field(
        None,
        ge=1,
        description="Requests one API key may have in flight at once, streams until their last byte "
        "(all clients together without keys); past it 429 at once. A key's own value wins; unset: no cap.",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request's complete headers, counted from the "
        "connection or the request's first byte; a slower connection is closed.",
    )
    body_timeout: float = Field(
        30.0, gt=0, description="Seconds a client has to send a request's whole body; slower uploads get 408."
    )
    stream_write_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a response may wait for its client to read (the socket full); past it the "
        "connection is closed and its request aborted.",
    )
    keep_alive_timeout: int = Field(
        5,
        ge=1,
        description="Seconds an idle keep-alive connection stays open between requests; behind a load "
        "balancer set it above the balancer's idle timeout.",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        description="Most open connections (and requests running) at once; past it a request gets 503 "
        "and its connection is closed.",
    )
    backlog: int = Field(
        2048, ge=1, description="Connections the kernel queues before the server accepts them."
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="Seconds in-flight requests get to finish after SIGTERM or SIGINT."
    )
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (* for any); CORS is off when empty."
    )
    cors_allow_credentials: bool = Field(False, description="Let CORS requests carry credentials.")
    log_format: Literal["json", "text"] = Field("json", description="Log lines as JSON objects or text.")
    log_requests: bool = Field(
        False, description="Put request and response bodies in the access log (prompts are private)."
    )
    otlp_endpoint: str | None = Field(
        None, description="OpenTelemetry OTLP/HTTP endpoint for traces (needs the otel extra)."
    )

    @field_validator("api_key", "cors_allow_origins", "pin", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else text.replace(",", " ").split()
        return value

    def api_keys(self) -> list[ApiKeySpec]:
        """Keys from ``api_key`` and ``api_key_file`` together."""
        from_file = read_key_file(self.api_key_file) if self.api_key_file else []
        return [*self.api_key, *from_file]

    @field_validator("model", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else text.split()
        return value

    @field_validator("model")
    @classmethod
    def _unique_names(cls, value: list[ModelSpec]) -> list[ModelSpec]:
        names = [spec.served_name for spec in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"two models are served as {', '.join(duplicates)}; give one an alias")
        if not value:
            raise ValueError("at least one model is needed")
        return value

    @field_validator("max_replicas")
    @classmethod
    def _autoscale_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        replicas = info.data.get("replicas", 1)
        if value is not None and value < replicas:
            raise ValueError(f"max_replicas ({value}) is below replicas ({replicas})")
        return value

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _check_keep_alive(cls, value: Any) -> Any:
        from inferd.config.durations import parse_keep_alive

        value = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        parse_keep_alive(value)  # raises with the reason
        return value

    def keep_alive_seconds(self) -> float | None:
        from inferd.config.durations import parse_keep_alive

        return parse_keep_alive(self.keep_alive)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch  # deferred: reading settings must not pay for importing torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def _placement(
        self, spec: ModelSpec | None, cuda_dtype: str, cpu_dtype: str = "float32"
    ) -> tuple[str, str]:
        """(device, dtype) for one model: its spec's choice, else the server's; auto dtype is
        ``cpu_dtype`` on the CPU and ``cuda_dtype`` on a GPU."""
        device = (spec.device if spec and spec.device else None) or self.resolved_device()
        dtype = (spec.dtype if spec and spec.dtype else None) or self.dtype
        if dtype == "auto":
            dtype = cuda_dtype if device.startswith("cuda") else cpu_dtype
        return device, dtype

    def encoder_config(self, spec: ModelSpec | None = None) -> EncoderConfig:
        # bf16 matrix products where the CPU has bf16 dot products: ~3x float32's passages/s on
        # all-MiniLM-L6-v2 (benchmarks/RESULTS.md), kept per model only where it stays faithful.
        cpu_dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
        device, dtype = self._placement(spec, cuda_dtype="float16", cpu_dtype=cpu_dtype)
        chosen = (spec.dtype if spec and spec.dtype else None) or self.dtype
        return EncoderConfig(
            max_batch_tokens=self.max_batch_tokens,
            max_batch_requests=self.max_batch_requests,
            max_queued_items=self.max_queued_items,
            max_client_batch_size=self.max_client_batch_size,
            max_request_chars=self.max_input_chars,
            num_threads=self.num_threads or available_cores(),
            device=device,
            dtype=dtype,
            dtype_gate=chosen == "auto" and device == "cpu" and dtype != "float32",
        )

    def llm_config(self, spec: ModelSpec | None = None) -> LLMConfig:
        # bf16 on a CPU with bf16 dot products: 1.4-3.6x faster linear layers than fp32 (see
        # benchmarks/RESULTS.md); without them bf16 is emulated and slower, so fp32 stays.
        cpu_dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
        device, dtype = self._placement(spec, cuda_dtype="bfloat16", cpu_dtype=cpu_dtype)
        return LLMConfig(
            block_size=self.block_size or default_block_size(device),
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            prefill_tokens_while_decoding=self._prefill_while_decoding(device),
            max_model_len=self.max_model_len,
            kv_cache_memory=self.kv_cache_memory,
            kv_cache_fraction=self.kv_cache_fraction,
            enable_prefix_caching=self.enable_prefix_caching,
            model_impl=self.model_impl,
            native_kernels=self.native_kernels,
            batch_invariant=self.batch_invariant,
            speculative_tokens=self.speculative_tokens,
            speculative_max_running=self.speculative_max_running,
            **self._precision(device, dtype),
            max_n=self.max_n,
            num_threads=self.num_threads or available_cores(),
            device=device,
            dtype=dtype,
            cache_dir=self.cache_dir,
            max_queued_requests=self.max_queued_requests,
            max_prompt_chars=self.max_prompt_chars,
            max_buffered_outputs=self.max_buffered_outputs,
        )

    def _prefill_while_decoding(self, device: str) -> int | None:
        value = self.prefill_tokens_while_decoding
        if value is None:
            return DEFAULT_CPU_PREFILL_WHILE_DECODING if device == "cpu" else None
        return value or None  # 0: no limit

    def _precision(self, device: str, dtype: str) -> dict[str, Any]:
        """quantization, kv_cache_dtype and which of them the server chose: auto is int8 wherever the
        native bf16 path runs (the load still checks that the model can, and probes it), else the
        model's own precision."""
        native_path = (
            device == "cpu" and dtype == "bfloat16" and self.native_kernels and self.model_impl == "auto"
        )
        plain = {"quantization": "none", "kv_cache_dtype": "model"}  # what auto is off that path
        auto = tuple(name for name in plain if getattr(self, name) == "auto")
        values = {name: getattr(self, name) for name in plain}
        values |= {name: "int8" if native_path else plain[name] for name in auto}
        return {**values, "auto_precision": auto if native_path else ()}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (AMX tiles or AVX-512 BF16)."""
    import torch  # deferred, as in resolved_device

    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_settings(overrides: dict[str, Any] | None = None, config_file: Path | None = None) -> ServerSettings:
    """Settings from flags (``overrides``), then ``INFERD_*`` variables, then ``config_file``."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if config_file is None:
        return ServerSettings(**overrides)
    if not config_file.is_file():
        raise ValueError(f"config file {config_file} does not exist")

    class _WithFile(ServerSettings):
        model_config = SettingsConfigDict(yaml_file=config_file)

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    loaded = _WithFile(**overrides)
    return ServerSettings.model_construct(
        **{name: getattr(loaded, name) for name in ServerSettings.model_fields}
    )


def settings_markdown() -> str:
    """The settings table for docs/OPERATIONS.md, generated from the declaration above."""
    rows = ["| flag | variable | default | description |", "|---|---|---|---|"]
    for name, field in ServerSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if name == "model":
            default = " ".join(DEFAULT_MODELS)
        flag = "--" + name.replace("_", "-")
        rows.append(f"| `{flag}` | `{ENV_PREFIX}{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows) + "\n"
