"""Scheduler admission: shared prompt prefixes are computed once without serialising admission."""

from inferd.config.engine import LLMConfig
from inferd.llm.kv_cache.manager import KVCacheManager
from inferd.llm.params import SamplingParams
from inferd.llm.request import Request
from inferd.llm.scheduler import Scheduler

SYSTEM = list(range(100, 148))  # three full blocks of 16 tokens shared by every prompt


def make_scheduler(**config) -> Scheduler:
    config = LLMConfig(**({"max_num_batched_tokens": 4096} | config))
    return Scheduler(config, KVCacheManager(512, config.block_size, config.enable_prefix_caching))


def step(scheduler: Scheduler) -> list[Request]:
    """Schedule, pretend the forward ran and sampled one token for each chunk that reached the end."""
    output = scheduler.schedule()
    scheduler.update_computed(output)
    for item in output.scheduled:
        if item.request.num_computed_tokens == item.request.num_tokens:
            item.request.token_ids.append(7)
    return [item.request for item in output.scheduled]


def request(index: int, prompt: list[int]) -> Request:
    return Request(str(index), prompt, SamplingParams(max_tokens=8), 8)


def test_requests_behind_one_system_prompt_are_admitted_in_two_steps():
    scheduler = make_scheduler()
    requests = [request(i, [*SYSTEM, 1000 + i, 2000 + i]) for i in range(32)]
    for r in requests:
        scheduler.add(r)
    first = step(scheduler)
    assert first == requests[:1]  # the others wait one step for the shared blocks
    second = step(scheduler)
    assert len(second) == 32 and not scheduler.waiting
    # Each later request computed only its own two tokens: the system prompt came from the cache.
    assert all(r.num_cached_tokens == len(SYSTEM) for r in requests[1:])


def test_cached_prefix_admits_without_waiting():
    scheduler = make_scheduler()
    warm = request(0, [*SYSTEM, 5, 6])
    scheduler.add(warm)
    step(scheduler)
    scheduler.add(request(1, [*SYSTEM, 8, 9, 10]))
    scheduler.add(request(2, [*SYSTEM, 11, 12, 13]))
    admitted = step(scheduler)
    assert {r.request_id for r in admitted} == {"0", "1", "2"}


def test_longer_in_flight_prefix_is_awaited_even_when_a_shorter_one_is_cached():
    scheduler = make_scheduler()
    scheduler.add(request(0, [*SYSTEM[:16], 3, 4]))  # caches only the first block
    step(scheduler)
    long_prompt = [*SYSTEM, *range(500, 564)]
    scheduler.add(request(1, [*long_prompt, 1]))
    scheduler.add(request(2, [*long_prompt, 2]))  # shares 7 full blocks with request 1
    assert [r.request_id for r in step(scheduler)] == ["0", "1"]
    third = step(scheduler)
    assert "2" in {r.request_id for r in third}
    assert scheduler.running[-1].num_cached_tokens == 112


def test_another_salts_prefix_in_flight_is_not_awaited():
    scheduler = make_scheduler()
    first = request(0, [*SYSTEM, 1])
    first.cache_salt = "tenant-a"
    other = request(1, [*SYSTEM, 2])
    other.cache_salt = "tenant-b"  # could never reuse tenant-a's blocks: waiting would only leak timing
    same = request(2, [*SYSTEM, 3])
    same.cache_salt = "tenant-a"
    for r in (first, other, same):
        scheduler.add(r)
    assert [r.request_id for r in step(scheduler)] == ["0", "1"]
    assert [r.request_id for r in step(scheduler)] == ["0", "1", "2"]
    assert (other.num_cached_tokens, same.num_cached_tokens) == (0, len(SYSTEM))


def test_no_waiting_without_prefix_caching():
    scheduler = make_scheduler(enable_prefix_caching=False)
    for i in range(4):
        scheduler.add(request(i, [*SYSTEM, i]))
    assert len(step(scheduler)) == 4


def test_drafts_ride_along_only_where_free_blocks_and_the_budget_hold_them():
    """Speculative drafts are guesses: they take free blocks and budget left over, and never preempt
    a request (not even their own) to get them."""
    config = LLMConfig(block_size=4, max_num_batched_tokens=64)
    scheduler = Scheduler(config, KVCacheManager(4, 4, False))  # 4 blocks of 4 tokens
    a, b = request(0, [1, 2, 3, 4, 5, 6, 7]), request(1, [11, 12, 13, 14, 15, 16, 17])
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)  # both prefill 7 tokens (2 blocks each) and sample their 8th
    assert a.num_tokens == b.num_tokens == 8 and scheduler.kv_cache.pool.num_free_blocks == 0
    a.draft_token_ids = [21, 22, 23]  # would need a third block: none is free
    output = scheduler.schedule()
    assert [(item.request, item.num_new_tokens, item.num_drafts) for item in output.scheduled] == [
        (a, 1, 0),
        (b, 1, 0),
    ]
    assert not output.preempted and scheduler.num_preemptions == 0


def test_drafts_are_cut_to_the_budget_and_not_counted_as_computed():
    scheduler = make_scheduler(max_num_batched_tokens=3)
    a = request(0, [1, 2])
    scheduler.add(a)
    step(scheduler)
    a.draft_token_ids = [5, 6, 7, 8]
    output = scheduler.schedule()
    (item,) = output.scheduled
    assert (item.num_new_tokens, item.num_drafts, item.reaches_end) == (3, 2, True)
    scheduler.update_computed(output)
    assert a.num_computed_tokens == 3  # the last known token only; the engine counts accepted drafts


def chunks(scheduler: Scheduler) -> dict[str, int]:
    """One step: each scheduled request's new tokens."""
    output = scheduler.schedule()
    scheduler.update_computed(output)
    for item in output.scheduled:
        if item.request.num_computed_tokens == item.request.num_tokens:
            item.request.token_ids.append(7)
    return {item.request.request_id: item.num_new_tokens for item in output.scheduled}


def test_while_others_decode_one_long_prompt_a_step_goes_in_chunks_and_short_ones_pass():
    """A RAG context arriving while a stream decodes goes in chunks of prefill_tokens_while_decoding
    between its tokens (the decode is never held back); a second long prompt waits for the first,
    running or waiting, and a short prompt behind it is admitted whole meanwhile."""
    scheduler = make_scheduler(prefill_tokens_while_decoding=256, max_num_batched_tokens=2048)
    scheduler.add(request(0, list(range(1, 40))))
    assert chunks(scheduler) == {"0": 39}  # nobody decodes yet
    scheduler.add(request(1, list(range(1000, 1600))))  # 600 tokens: long
    scheduler.add(request(2, list(range(2000, 2300))))  # 300: long too, waits its turn
    scheduler.add(request(3, list(range(3000, 3200))))  # 200: short, passes request 2
    assert chunks(scheduler) == {"0": 1, "1": 256, "3": 200}
    assert [r.request_id for r in scheduler.waiting] == ["2"]
    assert chunks(scheduler) == {"0": 1, "1": 256, "3": 1}
    # request 1 has 88 left: short now, whole; request 2 gets the long chunk
    assert chunks(scheduler) == {"0": 1, "1": 88, "3": 1, "2": 256}
    assert chunks(scheduler) == {"0": 1, "1": 1, "3": 1, "2": 44}


def test_two_running_long_prompts_take_turns():
    scheduler = make_scheduler(prefill_tokens_while_decoding=256, max_num_batched_tokens=2048)
    scheduler.add(request(1, list(range(1000, 1600))))
    scheduler.add(request(2, list(range(2000, 2700))))
    scheduler.add(request(0, list(range(1, 40))))
    assert chunks(scheduler) == {"1": 600, "2": 700, "0": 39}  # nobody decodes: the whole budget
    for r in scheduler.running[:2]:  # as if preempted and recomputed: long again
        r.num_computed_tokens = 0
    assert chunks(scheduler) == {"1": 256, "0": 1}  # request 2 skips this step, keeps its place
    assert chunks(scheduler) == {"1": 256, "0": 1}
    assert chunks(scheduler) == {"1": 89, "2": 256, "0": 1}


def test_without_a_decode_a_long_prompt_takes_the_whole_budget():
    scheduler = make_scheduler(prefill_tokens_while_decoding=256, max_num_batched_tokens=2048)
    scheduler.add(request(0, list(range(1000, 1600))))
    assert chunks(scheduler) == {"0": 600}
    uncapped = make_scheduler(max_num_batched_tokens=2048)  # None: no cap (a GPU's default)
    uncapped.add(request(0, list(range(1, 40))))
    chunks(uncapped)
    uncapped.add(request(1, list(range(1000, 1600))))
    assert chunks(uncapped) == {"0": 1, "1": 600}
