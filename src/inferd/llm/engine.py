"""LLMEngine: the synchronous core. One step = schedule → run → sample → update."""

from __future__ import annotations

import logging
import time
from asyncio import CancelledError
from dataclasses import dataclass, field, replace

from inferd.config.engine import DEFAULT_DRAFTS, LLMConfig
from inferd.errors import EngineError, InferdError, InputTooLongError, InvalidRequestError
from inferd.llm.detokenizer import IncrementalDetokenizer
from inferd.llm.kv_cache.manager import KVCacheManager
from inferd.llm.memory import plan_num_blocks
from inferd.llm.models.loader import LoadedModel
from inferd.llm.outputs import SCORE, RequestOutput, TokenLogprob
from inferd.llm.params import Guide, SamplingParams
from inferd.llm.request import FinishReason, Request
from inferd.llm.runner.model_runner import ModelRunner, ScheduledChunk
from inferd.llm.sampler import AllowedTokens, Sampler, SamplerOutput, SamplingState, edits_logits
from inferd.llm.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from inferd.llm.spec_decode import NgramDrafter, NgramIndex
from inferd.llm.structured import GuideManager, GuideState

log = logging.getLogger(__name__)

# Seeds torch.Generator.manual_seed accepts.
_SEED_RANGE = range(-(2**63), 2**64)
# Exceptions that are control flow, not one request's failure: they end the engine loop as before.
_CONTROL_FLOW = (KeyboardInterrupt, SystemExit, GeneratorExit, CancelledError)


def is_request_error(exc: BaseException) -> bool:
    """Whether ``exc``, raised while serving one request, fails that request only.

    Every Exception does, and so does any other BaseException that is not control flow: pyo3 turns a
    panic in a Rust extension (tokenizers' DecodeStream) into ``pyo3_runtime.PanicException``, which
    derives from BaseException so that ``except Exception`` does not swallow it."""
    return not isinstance(exc, _CONTROL_FLOW)


@dataclass(slots=True)
class _Live:
    """A request with its sampler state, detokenizer (None for a scoring request: it has no text)
    and grammar (structured output), if any."""

    request: Request
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer | None
    guide: GuideState | None = None
    ngrams: NgramIndex | None = None  # its n-grams, once it drafts (speculative decoding)


@dataclass(slots=True)
class _StepRun:
    """What one forward produced: tokens for each of ``sampled`` (its rows of ``result``: one, or
    one per draft and one more when it had drafts), and the score log-probabilities of each scoring
    request that reached its prompt's end."""

    sampled: list[tuple[ScheduledRequest, list[int]]]
    result: SamplerOutput
    scored: list[tuple[Request, tuple[float, ...]]] = field(default_factory=list)


class LLMEngine:
    """Adds, aborts and steps requests. Not thread-safe: the engine loop is its only caller."""

    def __init__(self, loaded: LoadedModel, config: LLMConfig) -> None:
        self.config = config
        self.facts = loaded.facts
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.facts.max_model_len
        num_blocks = plan_num_blocks(loaded.facts, config)
        capacity = num_blocks * config.block_size
        if capacity < self.max_model_len:
            # A request that can outgrow the whole cache would preempt itself forever.
            log.warning(
                "the KV cache holds %d tokens: max_model_len lowered from %d", capacity, self.max_model_len
            )
            self.max_model_len = capacity
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv_cache)
        self.runner = ModelRunner(loaded, config, num_blocks)
        native = self.runner.native
        self.sampler = Sampler(
            loaded.facts.vocab_size, set(loaded.facts.eos_token_ids), argmax=native.argmax if native else None
        )
        self.guides = GuideManager(loaded.tokenizer, loaded.facts.vocab_size, loaded.facts.eos_token_ids)
        self._live: dict[str, _Live] = {}
        drafts = config.speculative_tokens
        if drafts is None:
            drafts = DEFAULT_DRAFTS if self.runner.batch_invariant else 0
        self.drafter = NgramDrafter(drafts) if drafts else None
        if self.drafter is not None:
            log.info(
                "speculative decoding: up to %d prompt-lookup drafts per greedy request while at most %d run",
                drafts,
                config.speculative_max_running,
            )
        self.num_draft_tokens = 0  # drafts verified so far
        self.num_accepted_tokens = 0  # of those, the ones the model chose too
        self.num_step_tokens = 0  # tokens the last step computed (for the iteration-tokens metric)
        # The last step's grammar masks: rows masked and seconds spent filling them (for the metric).
        self.num_mask_rows = 0
        self.mask_seconds = 0.0
        log.info(
            "LLM KV cache: %d blocks of %d tokens (%.0f MiB, %s)",
            num_blocks,
            config.block_size,
            num_blocks * config.block_size * loaded.facts.kv_bytes_per_token() / 2**20,
            "int8" if loaded.facts.kv_int8 else str(loaded.facts.dtype).removeprefix("torch."),
        )

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Raise a typed error for a request that can never run; return its resolved max_tokens.

        Everything the engine indexes with is checked here, before admission: a bad id found only
        while sampling would fail the whole step, and with it every request sharing the step."""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        self.check_token_ids(prompt_token_ids, "prompt")
        if params.is_scoring:
            self._check_scoring(len(prompt_token_ids), params)
            return 0
        max_tokens = self._check_length(len(prompt_token_ids), params)
        self._check_params(params, max_tokens)
        return max_tokens

    def check_token_ids(self, token_ids, param: str) -> None:
        """Raise InvalidRequestError(param=``param``) unless every id lies in [0, vocab_size)."""
        vocab_size = self.facts.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"{param}: token id {bad} is outside the vocabulary (ids 0 to {vocab_size - 1}, "
                f"vocabulary size {vocab_size})",
                param=param,
            )

    def check_guide(self, guide: Guide) -> None:
        """Raise InvalidRequestError for a grammar llguidance rejects (thread-safe: the API calls it
        on a worker thread, before admission)."""
        self.guides.check(guide)

    def _check_length(self, num_prompt: int, params: SamplingParams) -> int:
        room = self.max_model_len - num_prompt
        if room < 1 or (params.max_tokens is not None and params.max_tokens > room):
            asked = num_prompt + (params.max_tokens or 1)
            raise InputTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {asked} tokens ({num_prompt} in the messages, {params.max_tokens or 1} "
                "in the completion). Please reduce the length of the messages or completion.",
                limit=self.max_model_len,
                length=asked,
                param="messages",
            )
        self._check_fits_cache(num_prompt, num_prompt + 1)
        return room if params.max_tokens is None else params.max_tokens

    def _check_fits_cache(self, num_prompt: int, num_tokens: int) -> None:
        if not self.kv_cache.can_fit(num_tokens):
            raise InputTooLongError(
                f"the prompt has {num_prompt} tokens, more than this server's KV cache can ever hold "
                f"({self.kv_cache.pool.num_blocks * self.config.block_size} tokens)",
                limit=self.kv_cache.pool.num_blocks * self.config.block_size,
                length=num_prompt,
            )

    def _check_scoring(self, num_prompt: int, params: SamplingParams) -> None:
        """A scoring request computes its prompt only: it may fill the whole context."""
        if num_prompt > self.max_model_len:
            raise InputTooLongError(
                f"the prompt has {num_prompt} tokens, more than this model's maximum context length "
                f"of {self.max_model_len} tokens",
                limit=self.max_model_len,
                length=num_prompt,
                param="prompt",
            )
        self._check_fits_cache(num_prompt, num_prompt)
        if not params.score_token_ids:
            raise InvalidRequestError("score_token_ids must not be empty", param="score_token_ids")
        self.check_token_ids(params.score_token_ids, "score_token_ids")
        if params.guide is not None:
            raise InvalidRequestError("a scoring request generates nothing to guide", param="response_format")

    def _check_params(self, params: SamplingParams, max_tokens: int) -> None:
        """The sampling parameters the sampler and the detokenizer index or count with."""
        self.check_token_ids(params.logit_bias, "logit_bias")
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        if params.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({params.min_tokens}) is more than max_tokens ({max_tokens})", param="min_tokens"
            )
        vocab_size = self.facts.vocab_size
        for name in ("logprobs", "prompt_logprobs"):
            count = getattr(params, name)
            if count is not None and not 0 <= count <= vocab_size:
                raise InvalidRequestError(
                    f"{name} must be between 0 and the vocabulary size ({vocab_size}), got {count}",
                    param="logprobs",
                )
        if params.seed is not None and params.seed not in _SEED_RANGE:
            raise InvalidRequestError(f"seed must be in [-2**63, 2**64), got {params.seed}", param="seed")
        if not all(params.stop):
            raise InvalidRequestError("stop sequences must not be empty", param="stop")

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
    ) -> None:
        """Queue a request; ``cache_salt`` limits prefix-cache sharing to requests with the same salt."""
        max_tokens = self.check_prompt(prompt_token_ids, params)
        # A grammar that does not compile fails this request here, before it takes any blocks.
        guide = self.guides.start(params.guide) if params.guide is not None else None
        request = Request(request_id, list(prompt_token_ids), params, max_tokens, cache_salt=cache_salt)
        detokenizer = None
        if not params.is_scoring:
            detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
        self._live[request_id] = _Live(
            request, SamplingState.create(params, prompt_token_ids), detokenizer, guide
        )
        self.scheduler.add(request)

    def stats_line(self) -> str:
        """One log line on the engine's state, prefix-cache hit rate included."""
        kv = self.kv_cache
        queried = kv.num_prefix_queries
        hit_rate = kv.num_prefix_hits / queried if queried else 0.0
        return (
            f"running {len(self.scheduler.running)}, waiting {len(self.scheduler.waiting)}, "
            f"KV cache {kv.usage:.0%} used, prefix cache hit rate {hit_rate:.1%} "
            f"({kv.num_prefix_hits}/{queried} tokens), preemptions {self.scheduler.num_preemptions}"
        )

    def failed_output(
        self, request_id: str, prompt_token_ids: list[int], error: BaseException
    ) -> RequestOutput:
        """The output that tells a client its request could not even start."""
        return RequestOutput(
            request_id,
            [],
            "",
            None,
            FinishReason.ERROR.value,
            len(prompt_token_ids),
            0,
            0,
            error=error if isinstance(error, InferdError) else EngineError(f"generation failed: {error}"),
        )

    def abort(self, request_id: str) -> None:
        live = self._live.pop(request_id, None)
        if live is not None:
            self.scheduler.finish(live.request, FinishReason.ABORT)

    def step(self) -> list[RequestOutput]:
        self._propose_drafts()
        output = self.scheduler.schedule()
        self.num_step_tokens = output.num_tokens
        self.num_mask_rows, self.mask_seconds = 0, 0.0
        if not output.scheduled:
            return []
        seeded = self._seeded_states(output.scheduled)
        try:
            run = self._run(output.scheduled)
        except BaseException as exc:
            if not is_request_error(exc):
                raise
            log.exception("a step of %d requests failed; running them one by one", len(output.scheduled))
            for generator, state in seeded:  # draws of the failed step never happened
                generator.set_state(state)
            return self._run_apart(output.scheduled)
        self.scheduler.update_computed(output)
        return self._outputs(run)

    def _propose_drafts(self) -> None:
        """Drafts for each running greedy request that decodes and whose logits nothing edits
        (penalties, bias, min_tokens, a grammar: their rows would depend on the drafts before
        them), while few enough requests run for the extra rows to pay."""
        if self.drafter is None:  # no request ever gets drafts: nothing to clear either
            return
        running = self.scheduler.running
        use = len(running) <= self.config.speculative_max_running
        for request in running:
            request.draft_token_ids = []
            if not use or request.num_computed_tokens != request.num_tokens - 1:
                continue
            live = self._live.get(request.request_id)
            eligible = live is not None and live.guide is None and request.params.is_greedy
            if not eligible or request.params.is_scoring or edits_logits(live.sampling):
                continue
            # the tokens verification may add: the drafts and one more, within max_tokens and the context
            room = min(
                request.max_tokens - request.num_output_tokens, self.max_model_len - request.num_tokens
            )
            if live.ngrams is None:
                live.ngrams = self.drafter.index()
            request.draft_token_ids = self.drafter.propose(live.ngrams, request.token_ids, room - 1)

    def _run(self, scheduled: list[ScheduledRequest]) -> _StepRun:
        """Forward the scheduled chunks, sample a token for each generating request that reached
        its end and score each scoring one that did. It leaves the requests as they were (a prompt
        logprob is only ever added once, grammar masks only read their matchers), so it may run
        again."""
        logits = self.runner.execute(self._chunks(scheduled))
        sample_rows, prompt_rows, score_rows = self._split_rows(scheduled)
        if prompt_rows:
            self._collect_prompt_logprobs(logits, prompt_rows)
        # one sampler row per logits row: a request with drafts repeats its state (nothing edits its
        # logits, so each row is sampled as plain decoding would sample it)
        lives = [self._live[item.request.request_id] for item, rows in sample_rows for _ in rows]
        allowed = self._prepare_masks(lives)
        states = [live.sampling for live in lives]
        picked = [row for _, rows in sample_rows for row in rows]
        # A decode step samples every row in order: indexing would only copy the whole (rows,
        # vocab) float32 logits (6 MB at 32 rows of a 49k vocabulary). The sampler edits only a
        # copy of its own (process_logits), so the logits stay as the runner returned them.
        every_row = len(picked) == len(logits) and picked == list(range(len(logits)))
        result = self.sampler.sample(logits if every_row else logits[picked], states, allowed)
        sampled, first = [], 0
        for item, rows in sample_rows:
            sampled.append((item, list(range(first, first + len(rows)))))
            first += len(rows)
        return _StepRun(sampled, result, self._score(logits, score_rows) if score_rows else [])

    def _outputs(self, run: _StepRun) -> list[RequestOutput]:
        outputs = []
        for item, rows in run.sampled:
            if item.num_drafts:
                outputs.extend(self._verify(item, run.result, rows))
            else:
                outputs.append(self._update(item.request, run.result, rows[0]))
        outputs.extend(self._finish_score(request, logprobs) for request, logprobs in run.scored)
        return outputs

    def _verify(self, item: ScheduledRequest, result: SamplerOutput, rows: list[int]) -> list[RequestOutput]:
        """Greedy verification: row i chose the token after the request's last token and drafts
        0..i-1; each draft it agrees with is kept (its cache entry, computed this step, counts from
        now on) and the first disagreement, or the row after the last draft, adds the model's own
        token. Each token goes out as its own delta, as plain decoding would send it."""
        request, drafts = item.request, request_drafts(item)
        outputs = []
        for i, row in enumerate(rows):
            token_id = result.token_ids[row]
            outputs.append(self._update(request, result, row))
            if i == len(drafts):  # the row after the last draft: the model's own next token
                break
            self.num_draft_tokens += 1  # a draft compared with the model's choice
            if token_id != drafts[i]:
                break
            self.num_accepted_tokens += 1
            if request.is_finished:
                break
            request.num_computed_tokens += 1  # the draft's entry holds this token's keys and values
            self.kv_cache.commit(
                request.request_id, request.token_ids, request.num_computed_tokens, request.cache_salt
            )
        return outputs

    def _score(
        self, logits, score_rows: list[tuple[Request, int]]
    ) -> list[tuple[Request, tuple[float, ...]]]:
        """Each scoring request's log-probabilities of its score_token_ids at its last prompt row."""
        import torch

        rows = torch.tensor([row for _, row in score_rows])
        logprobs = torch.log_softmax(logits[rows, : self.facts.vocab_size].float(), dim=-1).cpu()
        return [
            (request, tuple(logprobs[i, list(request.params.score_token_ids)].tolist()))
            for i, (request, _) in enumerate(score_rows)
        ]

    def _finish_score(self, request: Request, logprobs: tuple[float, ...]) -> RequestOutput:
        """End a scoring request whose prompt is computed: its blocks go (full ones stay cached)."""
        live = self._live.pop(request.request_id)
        self.scheduler.finish(live.request, FinishReason.STOP)
        output = self._output(request, [], "", None, FinishReason.STOP)
        return replace(output, finish_reason=SCORE, score_logprobs=logprobs)

    def _prepare_masks(self, lives: list[_Live]) -> AllowedTokens | None:
        """What the grammar allows in the sampled rows of guided requests (None: no such row)."""
        rows = [(row, live.guide, live.sampling) for row, live in enumerate(lives) if live.guide is not None]
        if not rows:
            return None
        start = time.perf_counter()
        allowed = self.guides.prepare_masks(rows)
        self.mask_seconds += time.perf_counter() - start
        self.num_mask_rows += len(rows)
        return allowed

    def _seeded_states(self, scheduled: list[ScheduledRequest]) -> list[tuple]:
        """Seeded requests' generator states before a step (a few KB each, seeded rows only): if
        the step fails after drawing, the retry must draw the same numbers again."""
        generators = (self._live[item.request.request_id].sampling.generator for item in scheduled)
        return [(g, g.get_state()) for g in generators if g is not None]

    def _run_apart(self, scheduled: list[ScheduledRequest]) -> list[RequestOutput]:
        """After a failed step: each request alone, so that only one that fails again fails. A
        forward writes only its own request's KV slots, and writing them again writes the same
        values, so the others go on exactly as if the step had gone through."""
        survivors, outputs = [], []
        for item in scheduled:
            try:
                survivors.append((item, self._run([item])))
            except BaseException as exc:
                if not is_request_error(exc):
                    raise
                log.exception("request %s failed", item.request.request_id)
                outputs.append(self._fail(item.request, exc))
        self.scheduler.update_computed(SchedulerOutput([item for item, _ in survivors]))
        for _, run in survivors:
            outputs.extend(self._outputs(run))
        return outputs

    def _num_logits(self, item) -> int:
        if item.num_drafts:
            return 1 + item.num_drafts
        request = item.request
        if request.wants_prompt_logprobs and request.num_computed_tokens < request.num_prompt_tokens:
            return item.num_new_tokens
        return 1 if item.reaches_end else 0

    def _split_rows(self, scheduled: list[ScheduledRequest]):
        """Which logits rows sample a next token, which score the prompt's own tokens, and which
        are a scoring request's last prompt position."""
        sample_rows, prompt_rows, score_rows, row = [], [], [], 0
        for item in scheduled:
            request, count = item.request, self._num_logits(item)
            if count > 1 or (count == 1 and not item.reaches_end):
                start = request.num_computed_tokens
                for offset in range(count):
                    position = start + item.num_new_tokens - count + offset
                    already = len(request.prompt_logprobs)
                    if position + 1 < request.num_prompt_tokens and position >= already:
                        prompt_rows.append((request, row + offset, request.prompt_token_ids[position + 1]))
            if item.reaches_end and request.params.is_scoring:
                score_rows.append((request, row + count - 1))
            elif item.num_drafts:
                sample_rows.append((item, list(range(row, row + count))))
            elif item.reaches_end:
                sample_rows.append((item, [row + count - 1]))
            row += count
        return sample_rows, prompt_rows, score_rows

    def _collect_prompt_logprobs(self, logits, prompt_rows) -> None:
        import torch

        rows = torch.tensor([row for _, row, _ in prompt_rows])
        logprobs = torch.log_softmax(logits[rows, : self.facts.vocab_size], dim=-1)
        targets = torch.tensor([target for _, _, target in prompt_rows])
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        k = max(request.params.prompt_logprobs for request, _, _ in prompt_rows)
        top_values, top_ids = logprobs.topk(max(k, 1), dim=-1)
        for i, (request, _, target) in enumerate(prompt_rows):
            n = request.params.prompt_logprobs
            top = tuple(zip(top_ids[i, :n].tolist(), top_values[i, :n].tolist()))
            request.prompt_logprobs.append(TokenLogprob(target, chosen[i], top))

    def _chunks(self, scheduled: list[ScheduledRequest]) -> list[ScheduledChunk]:
        chunks = []
        for item in scheduled:
            request = item.request
            start = request.num_computed_tokens
            known = item.num_new_tokens - item.num_drafts
            chunks.append(
                ScheduledChunk(
                    request.token_ids[start : start + known] + request_drafts(item),
                    start,
                    self.kv_cache.block_table(request.request_id),
                    self._num_logits(item),
                )
            )
        return chunks

    def _update(self, request: Request, result: SamplerOutput, row: int) -> RequestOutput:
        """Append the row's token to the request; any error in doing so fails this request only."""
        try:
            return self._append(request, result, row)
        except BaseException as exc:
            if not is_request_error(exc):
                raise
            if isinstance(exc, InvalidRequestError):  # the client's: a grammar that cannot be followed
                log.info("request %s failed: %s", request.request_id, exc.message)
            else:
                log.exception("updating request %s failed", request.request_id)
            return self._fail(request, exc)

    def _append(self, request: Request, result: SamplerOutput, row: int) -> RequestOutput:
        live = self._live[request.request_id]
        token_id = result.token_ids[row]
        request.token_ids.append(token_id)
        live.sampling.output_token_ids.append(token_id)
        # The grammar takes the token first: one it refuses fails the request before any text is sent.
        is_complete = live.guide is not None and live.guide.advance(live.sampling.output_token_ids)
        logprobs = _logprobs(result, row, token_id) if request.params.logprobs is not None else None
        reason, stop_reason = self._token_finish_reason(live, token_id, is_complete)
        text = ""
        if reason is None or reason is FinishReason.LENGTH:
            # EOS and stop token ids end the text without being part of it.
            try:
                text = live.detokenizer.push(token_id)
            except BaseException as exc:  # one request's decoding bug (or panic) fails that request only
                if not is_request_error(exc):
                    raise
                log.exception("detokenising request %s failed", request.request_id)
                return self._finish(live, FinishReason.ERROR, "", [token_id], None, error=exc)
            if live.detokenizer.stopped_on is not None:
                reason, stop_reason = FinishReason.STOP, live.detokenizer.stopped_on
            elif is_complete:  # the grammar's last token is text; the output is whole, not cut
                reason = FinishReason.STOP
        if reason is None:
            return self._output(request, [token_id], text, logprobs, None)
        return self._finish(live, reason, text, [token_id], logprobs, stop_reason=stop_reason)

    def _token_finish_reason(
        self, live: _Live, token_id: int, is_complete: bool
    ) -> tuple[FinishReason | None, int | None]:
        request, params = live.request, live.request.params
        if token_id in params.stop_token_ids:
            return FinishReason.STOP, token_id
        # An EOS the grammar took ends the request whatever ignore_eos and min_tokens say: the
        # grammar allows it to them only when it allows nothing else.
        eos_allowed = is_complete or (not params.ignore_eos and request.num_output_tokens > params.min_tokens)
        if eos_allowed and token_id in self.facts.eos_token_ids:
            return FinishReason.STOP, None
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def _finish(self, live, reason, text, token_ids, logprobs, *, stop_reason=None, error=None):
        self.scheduler.finish(live.request, reason)
        del self._live[live.request.request_id]
        if reason is FinishReason.ERROR:
            return self._output(live.request, token_ids, text, logprobs, reason, error=error)
        tail = "" if reason is FinishReason.ABORT else live.detokenizer.flush()
        return self._output(live.request, token_ids, text + tail, logprobs, reason, stop_reason)

    def _fail(self, request: Request, exc: BaseException) -> RequestOutput:
        live = self._live.get(request.request_id)
        if live is None:  # it had finished when the error came (flushing its last text)
            return self._output(request, [], "", None, FinishReason.ERROR, error=exc)
        return self._finish(live, FinishReason.ERROR, "", [], None, error=exc)

    def _output(self, request, token_ids, text, logprobs, reason, stop_reason=None, error=None):
        prompt_logprobs = None
        if request.wants_prompt_logprobs and request.num_output_tokens == len(token_ids):
            prompt_logprobs = [None, *request.prompt_logprobs]
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=token_ids,
            new_text=text,
            logprobs=logprobs,
            finish_reason=reason.value if reason is not None else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            stop_reason=stop_reason,
            error=_request_error(error),
            prompt_logprobs=prompt_logprobs,
            arrival_time=request.arrival_time,
            first_scheduled_time=request.first_scheduled_time,
        )


def request_drafts(item: ScheduledRequest) -> list[int]:
    """The draft tokens a scheduled item computes after its request's last known token."""
    return item.request.draft_token_ids[: item.num_drafts]


def _request_error(error: BaseException | None) -> InferdError | None:
    """What a client is told of the error that ended its request: its own (a grammar it sent that
    cannot be followed) as it is, anything else as a failed generation."""
    if error is None or isinstance(error, InvalidRequestError):
        return error
    return EngineError(f"generation failed: {error}")


def _logprobs(result: SamplerOutput, row: int, token_id: int) -> list[TokenLogprob]:
    top = tuple(result.top_logprobs[row]) if result.top_logprobs else ()
    return [TokenLogprob(token_id, result.logprobs[row], top)]
