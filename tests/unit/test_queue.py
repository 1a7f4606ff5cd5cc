import asyncio
import threading

import pytest

from inferd.encoder.queue import BatchQueue
from inferd.encoder.request import EncodeRequest, Item
from inferd.errors import OverloadedError


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def items(loop, lengths):
    request = EncodeRequest(loop, len(lengths))
    return [Item(request, i, [1] * n) for i, n in enumerate(lengths)]


def queue(**kw):
    defaults = dict(max_batch_tokens=1000, max_batch_requests=8, max_queued_items=100)
    return BatchQueue(**(defaults | kw))


def test_padded_budget_and_request_limit_hold(loop):
    q = queue(max_batch_tokens=100, max_batch_requests=3)
    q.put(items(loop, [30, 30, 30, 30, 30]))
    first = q.next_batch(0)
    assert len(first) == 3  # 3 × 30 = 90 ≤ 100, and the request limit is 3
    q2 = queue(max_batch_tokens=100, max_batch_requests=10)
    q2.put(items(loop, [40, 10, 10]))
    batch = q2.next_batch(0)
    assert max(i.num_tokens for i in batch) * len(batch) <= 100
    assert batch[0].num_tokens == 40  # the oldest item anchors the batch


def test_similar_lengths_are_grouped_around_the_oldest(loop):
    q = queue(max_batch_requests=3)
    q.put(items(loop, [50, 5, 200, 48, 6, 52, 210]))
    batch = q.next_batch(0)
    assert sorted(i.num_tokens for i in batch) == [48, 50, 52]
    # Next the oldest left is 5: 6 joins it, but 200 would make the batch mostly padding.
    assert sorted(i.num_tokens for i in q.next_batch(0)) == [5, 6]
    assert sorted(i.num_tokens for i in q.next_batch(0)) == [200, 210]
    assert q.next_batch(0) is None


def test_batches_stay_mostly_real_tokens(loop):
    q = queue(max_batch_requests=32, min_fill=0.85)
    q.put(items(loop, [180, 12, 55, 180, 12, 55, 170, 60, 14] * 4))
    while (batch := q.next_batch(0)) is not None:
        real = sum(i.num_tokens for i in batch)
        assert real >= 0.85 * max(i.num_tokens for i in batch) * len(batch)
    loose = queue(max_batch_requests=32, max_batch_tokens=10_000, min_fill=0.0)
    loose.put(items(loop, [180, 12, 55] * 4))
    assert len(loose.next_batch(0)) == 12  # without the floor everything fits one batch


def test_every_item_comes_out_exactly_once(loop):
    q = queue(max_batch_tokens=256, max_batch_requests=4)
    lengths = [(i * 37) % 120 + 1 for i in range(50)]
    q.put(items(loop, lengths))
    seen = []
    while (batch := q.next_batch(0)) is not None:
        assert max(i.num_tokens for i in batch) * len(batch) <= 256 or len(batch) == 1
        seen.extend(batch)
    assert sorted(i.num_tokens for i in seen) == sorted(lengths)
    assert len({id(i) for i in seen}) == 50


def test_items_of_cancelled_requests_are_dropped(loop):
    q = queue()
    dropped, kept = items(loop, [10, 10]), items(loop, [10])
    q.put(dropped + kept)
    dropped[0].request.is_cancelled = True
    batch = q.next_batch(0)
    assert batch == kept
    assert len(q) == 0


def test_full_queue_refuses_the_whole_request(loop):
    q = queue(max_queued_items=3)
    q.put(items(loop, [1, 1]))
    with pytest.raises(OverloadedError):
        q.put(items(loop, [1, 1]))
    assert len(q) == 2


def test_close_wakes_a_blocked_consumer(loop):
    q = queue()
    result = []
    consumer = threading.Thread(target=lambda: result.append(q.next_batch()))
    consumer.start()
    q.close()
    consumer.join(5)
    assert result == [None]


def test_top_up_adds_what_fits_oldest_first_and_only_unpadded(loop):
    q = queue(max_batch_tokens=100, max_batch_requests=4, is_padded=False)
    q.put(items(loop, [50]))
    batch = q.next_batch(0)
    q.put(items(loop, [30, 40, 15, 5, 5]))  # arrived while the batch waited for the model
    extra = q.top_up(batch)
    # 50 + 30 fits, 40 would pass 100, 15 fits (95); then the 4-item limit stops it
    assert [i.num_tokens for i in extra] == [30, 15, 5]
    assert [i.num_tokens for i in q.next_batch(0)] == [40, 5]  # the rest stays queued
    padded = queue(max_batch_tokens=100)
    padded.put(items(loop, [10]))
    first = padded.next_batch(0)
    padded.put(items(loop, [10]))
    assert padded.top_up(first) == [] and len(padded) == 1


def test_top_up_skips_cancelled_requests(loop):
    q = queue(is_padded=False)
    q.put(items(loop, [10]))
    batch = q.next_batch(0)
    gone = items(loop, [10, 10])
    gone[0].request.is_cancelled = True  # one request: both its items go
    q.put(gone)
    assert q.top_up(batch) == [] and len(q) == 0
