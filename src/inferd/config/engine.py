"""Frozen configs handed to the engines; derived facts live in the engines' own result objects."""

from __future__ import annotations

from dataclasses import dataclass, replace


def default_block_size(device: str) -> int:
    """KV-cache block size when none is set. Only whole blocks are reused from the prefix cache, so
    a repeated prompt recomputes its last partial block, and on the CPU a step of a few more rows
    costs visibly more (past ~8 rows the linear layers are compute-bound). 8-token blocks cut the
    chat benchmark's time to first token (64 prompts, warm prefix cache) at every concurrency: one
    stream 14 -> 12-13 ms, 32 streams 137-161 -> 93-112 ms, at the same throughput, measured on an
    AVX512-BF16 EPYC. CUDA keeps the usual 16."""
    return 8 if device == "cpu" else 16


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    """Batching and execution limits of one encoder engine."""

    max_batch_tokens: int = 16384
    max_batch_requests: int = 32
    max_queued_items: int = 8192
    max_client_batch_size: int = 2048
    # Characters one request may give the tokenizer, a prompt or a query counted once per input.
    max_request_chars: int = 16 * 2**20
    num_threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    # The server chose a reduced dtype (auto): serve it only where encoder.precision finds the model
    # faithful to its float32 self, else float32. A dtype asked for by name is served unchecked.
    dtype_gate: bool = False

    def __post_init__(self) -> None:
        for name in (
            "max_batch_tokens",
            "max_batch_requests",
            "max_queued_items",
            "max_client_batch_size",
            "max_request_chars",
            "num_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


# prefill_tokens_while_decoding on the CPU when not set (benchmarks/RESULTS.md, "int8 by
# default"): a 1,600-token RAG prompt in one step held every decoding stream for ~450 ms on a
# 2-core EPYC; 256 would cut chat prompts of 256-340 tokens too, 9 % off 32 chat streams.
DEFAULT_CPU_PREFILL_WHILE_DECODING = 512

# Draft tokens per step when speculative_tokens is left to the engine (benchmarks/RESULTS.md,
# "Prompt-lookup speculative decoding").
DEFAULT_DRAFTS = 4


@dataclass(frozen=True, slots=True)
class LLMConfig:
    """Scheduling, cache and execution limits of the LLM engine."""

    block_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    # While any request decodes, one prompt with more than this many tokens left gets this many a
    # step (None: no limit but the step's budget): a long prompt goes in chunks between the
    # decoders' tokens (Scheduler, _LongPrompts).
    prefill_tokens_while_decoding: int | None = None
    max_model_len: int | None = None  # None: the model's own context length
    kv_cache_memory: int | None = None  # bytes; None: kv_cache_fraction of what is free after loading
    kv_cache_fraction: float = 0.5
    enable_prefix_caching: bool = True
    max_n: int = 16  # most choices (n) per request
    num_threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: str | None = None  # where GGUF files are converted once; None: ~/.cache/inferd
    native_kernels: bool = True  # inferd's C kernels, built with the package (attention, fused ops, linears)
    # Where the whole step runs on the native kernels (bf16 with native linears): every prompt chunk
    # attends as query rows too, never through SDPA, so a token's numerics do not depend on how its
    # prompt was split (alone, chunked, after a prefix hit, in a batch). See ModelRunner._as_rows.
    batch_invariant: bool = True
    # Prompt-lookup speculative decoding (llm/spec_decode.py): up to this many draft tokens per
    # greedy request and step, copied from its own context; 0 turns it off; None: DEFAULT_DRAFTS
    # where the runner is batch-invariant (drafts then change no greedy output), else off. Only
    # while at most speculative_max_running requests run: one stream reads every weight once per
    # step whatever its rows, a full batch pays for every rejected draft.
    speculative_tokens: int | None = None
    speculative_max_running: int = 8
    model_impl: str = "auto"  # "auto": inferd's own forward where it has one; "transformers": never
    quantization: str = "none"  # "int8": the decoder's linear layers in int8 x int8 (CPU, bf16)
    # "int8": keys and values cached in int8, a scale per token and kv head (the native bf16 path's
    # attention reads them, paged_decode.c); "model": the model's dtype
    kv_cache_dtype: str = "model"
    # Which of quantization / kv_cache_dtype the server chose as int8 itself (--quantization auto,
    # --kv-cache-dtype auto): the load serves them only where the model can run them and the probe of
    # llm.precision finds them faithful to the bf16 path, else it reverts them (``fallback``).
    # A choice made by name is served as asked, or refused.
    auto_precision: tuple[str, ...] = ()
    max_queued_requests: int = 256  # requests waiting beyond max_num_seqs before 429
    max_prompt_chars: int | None = None  # None: 32 per token of the context (LLMClient.max_prompt_chars)
    # Outputs (one per generated token) a request may have waiting unread; past it the client is
    # cut and the request aborted, so a stream nobody reads cannot grow its buffer without end.
    max_buffered_outputs: int = 1024

    def __post_init__(self) -> None:
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_n", "num_threads")
        for name in (*positive, "max_buffered_outputs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.prefill_tokens_while_decoding is not None and self.prefill_tokens_while_decoding < 1:
            raise ValueError("prefill_tokens_while_decoding must be at least 1")
        if (self.speculative_tokens or 0) < 0 or self.speculative_max_running < 1:
            raise ValueError("speculative_tokens must be at least 0 and speculative_max_running at least 1")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError("kv_cache_fraction must be in (0, 1]")
        if self.quantization not in ("none", "int8"):
            raise ValueError(f"quantization must be none or int8, not {self.quantization!r}")
        if self.kv_cache_dtype not in ("model", "int8"):
            raise ValueError(f"kv_cache_dtype must be model or int8, not {self.kv_cache_dtype!r}")
        if not set(self.auto_precision) <= {"quantization", "kv_cache_dtype"}:
            raise ValueError(
                f"auto_precision names quantization or kv_cache_dtype, not {self.auto_precision!r}"
            )

    @property
    def cache_dtype(self) -> str:
        """The dtype the KV cache holds: ``kv_cache_dtype``, or the model's."""
        return self.dtype if self.kv_cache_dtype == "model" else self.kv_cache_dtype

    def reverted(self, *fields: str) -> LLMConfig:
        """This config with the server's own choices among ``fields`` back to the model's precision:
        unquantised weights, the KV cache in the model's dtype. Choices made by name stay."""
        fields = tuple(f for f in fields if f in self.auto_precision)
        plain = {"quantization": "none", "kv_cache_dtype": "model"}
        kept = tuple(f for f in self.auto_precision if f not in fields)
        return replace(self, **{f: plain[f] for f in fields}, auto_precision=kept)

    def fallback(self) -> LLMConfig:
        """What the server serves when its own int8 choices do not hold: all of them reverted."""
        return self.reverted(*self.auto_precision)
