"""Engine-side parameters of one generation request (plain dataclasses; pydantic stays at the edge)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Guide:
    """A grammar the request's output must follow (llguidance's grammar format, as a JSON string, as
    returned by llguidance.grammar_from(...) / LLMatcher.grammar_from_json_schema / _lark / _regex)."""

    grammar: str
    # Token ids: the grammar applies from just after the first occurrence of this sequence in the
    # OUTPUT (e.g. the ids of "</think>" so reasoning stays free); () = from the first output token.
    start_after: tuple[int, ...] = ()
    # The request field the grammar came from, named in the errors it causes.
    param: str = "response_format"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to choose each next token and when to stop.

    ``temperature == 0`` means greedy. ``max_tokens is None`` means "up to the context limit".
    ``logprobs``: number of top alternatives to report per token (0 = only the chosen token's
    logprob); None = no logprobs at all.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # completions' echo + logprobs
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    guide: Guide | None = None  # grammar-constrained decoding (structured output, forced tool calls)
    # Scoring instead of generating: prefill the prompt only, then finish with finish_reason "score"
    # and report the log-probabilities (fp32 log_softmax over the whole vocabulary) of exactly these
    # token ids at the prompt's last position (an LLM reranker's "yes"/"no"). No token is generated
    # and the sampling fields above are ignored.
    score_token_ids: tuple[int, ...] | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def is_scoring(self) -> bool:
        return self.score_token_ids is not None
