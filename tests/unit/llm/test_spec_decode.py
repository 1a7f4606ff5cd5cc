"""The prompt-lookup drafter: which tokens it proposes."""

from inferd.llm.spec_decode import NgramDrafter


def test_the_tokens_after_the_latest_occurrence_of_the_longest_matching_suffix():
    drafter = NgramDrafter(num_tokens=3, max_ngram=3, min_ngram=1)
    tokens = [7, 1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6, 1, 2, 3]
    # "1 2 3" occurs at 1 and 6: the latest (6) is followed by 4 5 6
    assert propose(drafter, tokens, limit=10) == [4, 5, 6]
    # a longer match beats a later shorter one: "9 1 2" only at 1, though "2" recurs later
    assert propose(drafter, [8, 9, 1, 2, 0, 2, 5, 9, 1, 2], limit=10) == [0, 2, 5]


def test_limits_and_misses():
    drafter = NgramDrafter(num_tokens=4, max_ngram=4, min_ngram=2)
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert propose(drafter, tokens, limit=2) == [3, 4]  # the room left (max_tokens, context)
    assert propose(drafter, tokens, limit=0) == []
    assert propose(drafter, [1, 2, 3, 4, 5], limit=4) == []  # no earlier "4 5"
    assert propose(drafter, [5, 2], limit=4) == []  # too short to hold a match and its suffix
    # the match may sit right before the suffix: drafts run out at the end of the tokens
    assert propose(drafter, [3, 3, 3], limit=4) == [3]


def test_the_index_grows_with_the_request_and_answers_as_a_fresh_one():
    """One index per request, extended with each step's tokens, proposes what an index built
    from scratch on the same tokens proposes."""
    import random

    rng = random.Random(0)
    drafter = NgramDrafter(num_tokens=5)
    tokens = [rng.randrange(6) for _ in range(40)]
    index = drafter.index()
    for _ in range(60):
        assert drafter.propose(index, tokens, 5) == propose(drafter, tokens, 5)
        tokens.extend(rng.randrange(6) for _ in range(rng.randint(1, 4)))


def propose(drafter: NgramDrafter, tokens: list[int], limit: int) -> list[int]:
    """A fresh index's proposal, checked against a plain scan for the latest longest match."""
    got = drafter.propose(drafter.index(), tokens, limit)
    expected = []
    for n in range(min(drafter.max_ngram, len(tokens) - 1), drafter.min_ngram - 1, -1):
        starts = [s for s in range(len(tokens) - n) if tokens[s : s + n] == tokens[-n:]]
        if starts:
            expected = tokens[starts[-1] + n : starts[-1] + n + min(limit, drafter.num_tokens)]
            break
    assert got == expected
    return got


def test_drafts_are_on_by_default_only_where_they_cannot_change_greedy_output(tiny_llama):
    """Unset, --speculative-tokens is DEFAULT_DRAFTS on the batch-invariant bf16 path (the bundled
    model's case: tests/integration/test_speculative.py) and off elsewhere (fp32's matmul rounds a
    row differently with more rows beside it); set, it wins."""
    import asyncio

    from inferd.config.engine import LLMConfig
    from inferd.llm.client import LLMClient

    def drafter(**config):
        loop = asyncio.new_event_loop()
        client = LLMClient.start(tiny_llama, LLMConfig(kv_cache_memory=8 * 2**20, **config), loop)
        try:
            return client.engine.runner.batch_invariant, client.engine.drafter
        finally:
            client.close()
            loop.close()

    invariant, chosen = drafter(dtype="float32")
    assert not invariant and chosen is None
    assert drafter(dtype="float32", speculative_tokens=3)[1].num_tokens == 3
    # bf16, but head_dim 16: the vectorised row attention does not apply, nor batch invariance
    assert drafter(dtype="bfloat16") == (False, None)
