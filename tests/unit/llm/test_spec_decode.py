"""The prompt-lookup drafter: which tokens it proposes."""

from inferd.llm.spec_decode import NgramDrafter


def test_the_tokens_after_the_latest_occurrence_of_the_longest_matching_suffix():
    drafter = NgramDrafter(num_tokens=3, max_ngram=3, min_ngram=1)
    #            0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [7, 1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6, 1, 2, 3]
    # "1 2 3" occurs at 1 and 6: the latest (6) is followed by 4 5 6
    assert drafter.propose(tokens, limit=10) == [4, 5, 6]
    # a longer match beats a later shorter one: "9 1 2" only at 5, though "2" recurs later
    assert drafter.propose([8, 9, 1, 2, 0, 2, 5, 9, 1, 2], limit=10) == [0, 2, 5]


def test_limits_and_misses():
    drafter = NgramDrafter(num_tokens=4, max_ngram=4, min_ngram=2)
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert drafter.propose(tokens, limit=2) == [3, 4]  # the room left (max_tokens, context)
    assert drafter.propose(tokens, limit=0) == []
    assert drafter.propose([1, 2, 3, 4, 5], limit=4) == []  # no earlier "4 5"
    assert drafter.propose([5, 2], limit=4) == []  # too short to hold a match and its suffix
    # the match may sit right before the suffix: drafts run out at the end of the tokens
    assert drafter.propose([3, 3, 3], limit=4) == [3]


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
