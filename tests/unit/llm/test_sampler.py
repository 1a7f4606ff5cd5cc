import math
from collections import Counter

import pytest
import torch

from inferd.llm.params import SamplingParams
from inferd.llm.sampler import Sampler, SamplingState

VOCAB = 20
EOS = 0


def state(prompt=(), output=(), **params) -> SamplingState:
    s = SamplingState.create(SamplingParams(**params), list(prompt))
    s.output_token_ids.extend(output)
    return s


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # torch.isclose, not torch.testing.assert_close: the latter costs seconds of lazy imports on first use.
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isclose(actual, expected.to(actual.dtype), rtol=1e-5, atol=1e-5).all(), (actual, expected)


def reference_process(logits: torch.Tensor, states: list[SamplingState], eos_ids: set[int]) -> torch.Tensor:
    """The rules written out token by token, the slow and obvious way."""
    out = logits.clone().tolist()
    for row, st in enumerate(states):
        p = st.params
        for token in set(st.prompt_token_ids) | set(st.output_token_ids):
            value = out[row][token]
            out[row][token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token, count in Counter(st.output_token_ids).items():
            out[row][token] -= p.frequency_penalty * count + p.presence_penalty
        for token, bias in p.logit_bias.items():
            out[row][token] += bias
        if len(st.output_token_ids) < p.min_tokens:
            for token in eos_ids | set(p.stop_token_ids):
                out[row][token] = -math.inf
    return torch.tensor(out)


def test_penalties_bias_and_min_tokens_match_the_reference_loop():
    torch.manual_seed(0)
    logits = torch.randn(5, VOCAB) * 3  # both signs, so both CTRL branches run
    original = logits.clone()
    states = [
        state(prompt=[1, 2, 3], output=[3, 3, 4], repetition_penalty=1.3),
        state(prompt=[5], output=[6, 6, 6, 7], frequency_penalty=0.5, presence_penalty=0.25),
        state(prompt=[8, 9], output=[9, 10, 10], repetition_penalty=0.8, frequency_penalty=-0.4),
        state(output=[11], presence_penalty=1.5, logit_bias={12: 4.0, 13: -2.5}),
        state(output=[1], min_tokens=3, stop_token_ids=(19,)),
    ]
    processed = Sampler(VOCAB, {EOS}).process_logits(logits, states)
    assert_close(processed, reference_process(original, states, {EOS}))
    assert torch.equal(logits, original), "the caller's logits must not be modified"


def test_rows_without_penalties_are_untouched_when_others_have_them():
    logits = torch.randn(2, VOCAB)
    states = [state(output=[1, 2]), state(output=[1, 2], repetition_penalty=2.0, frequency_penalty=1.0)]
    processed = Sampler(VOCAB, {EOS}).process_logits(logits, states)
    assert torch.equal(processed[0], logits[0])
    assert not torch.equal(processed[1], logits[1])


def test_greedy_takes_the_argmax_and_ignores_padded_vocab_columns():
    torch.manual_seed(1)
    logits = torch.randn(6, VOCAB + 4)
    logits[:, VOCAB:] = 1e4  # a padded embedding table's extra rows must never win
    out = Sampler(VOCAB, {EOS}).sample(logits, [state(temperature=0.0) for _ in range(6)])
    assert out.token_ids == logits[:, :VOCAB].argmax(dim=-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_logit_bias_forces_a_token_for_greedy_and_sampled_rows():
    logits = torch.randn(2, VOCAB)
    states = [state(temperature=0.0, logit_bias={7: 100.0}), state(temperature=1.0, logit_bias={7: 100.0})]
    assert Sampler(VOCAB, {EOS}).sample(logits, states).token_ids == [7, 7]


def test_min_tokens_blocks_eos_and_stop_token_ids_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    logits[0, 3] = 9.0
    logits[0, 5] = 8.0
    sampler = Sampler(VOCAB, {EOS})
    st = state(temperature=0.0, min_tokens=2, stop_token_ids=(3,))
    chosen = []
    for _ in range(3):
        token = sampler.sample(logits, [st]).token_ids[0]
        chosen.append(token)
        st.output_token_ids.append(token)
    assert chosen == [5, 5, EOS]


def test_top_k_one_and_tiny_top_p_equal_greedy():
    torch.manual_seed(2)
    logits = torch.randn(64, VOCAB)
    states = [state(temperature=1.5, top_k=1) for _ in range(32)]
    states += [state(temperature=1.5, top_p=1e-6) for _ in range(32)]
    out = Sampler(VOCAB, {EOS}).sample(logits, states)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def draw_frequencies(logits_row: torch.Tensor, n: int, **params) -> torch.Tensor:
    torch.manual_seed(1234)
    logits = logits_row.expand(n, -1).clone()
    out = Sampler(logits.shape[1], set()).sample(logits, [state(**params)] * n)  # unseeded: shareable
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.shape[1]).double() / n


def assert_matches(frequencies: torch.Tensor, probs: torch.Tensor, n: int) -> None:
    """Chi-square goodness of fit over the tokens with non-zero probability."""
    support = probs > 0
    assert frequencies[~support].sum() == 0, f"drew excluded tokens: {frequencies}"
    expected = probs[support] * n
    chi2 = (((frequencies[support] * n) - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5, f"chi2={chi2:.1f} freqs={frequencies.tolist()} probs={probs.tolist()}"  # df ≤ 5


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
N = 8_000


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
def test_temperature_sampling_matches_softmax(temperature):
    probs = torch.softmax(LOGITS.double() / temperature, dim=-1)
    assert_matches(draw_frequencies(LOGITS, N, temperature=temperature), probs, N)


def test_top_k_keeps_the_k_best_renormalised():
    probs = torch.softmax(LOGITS.double(), dim=-1)
    probs[3:] = 0
    assert_matches(draw_frequencies(LOGITS, N, top_k=3), probs / probs.sum(), N)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.softmax(LOGITS.double(), dim=-1)  # ≈ .47 .28 .17 .06 .02 .003
    kept = probs.clone()
    kept[3:] = 0  # mass before the 4th token is ≈ .92 ≥ .9: dropped; before the 3rd ≈ .75: kept
    assert_matches(draw_frequencies(LOGITS, N, top_p=0.9), kept / kept.sum(), N)


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.softmax(LOGITS.double(), dim=-1)
    kept = torch.where(probs >= 0.1 * probs.max(), probs, 0.0)  # drops the last two
    assert kept[3] > 0 and kept[4] == 0
    assert_matches(draw_frequencies(LOGITS, N, min_p=0.1), kept / kept.sum(), N)


def test_logprobs_are_log_softmax_of_processed_logits_before_temperature_and_filters():
    torch.manual_seed(3)
    logits = torch.randn(4, VOCAB)
    states = [
        state(output=[1, 1], frequency_penalty=0.7, temperature=0.3, top_k=2, logprobs=5),
        state(temperature=0.0, logprobs=0),
        state(temperature=1.0),  # asked for nothing: still gets the chosen logprob, no alternatives
        state(temperature=0.7, top_p=0.5, logprobs=VOCAB + 5),  # more than the vocabulary: capped
    ]
    sampler = Sampler(VOCAB, {EOS})
    expected = torch.log_softmax(reference_process(logits, states, {EOS}), dim=-1)
    out = sampler.sample(logits, states)
    assert out.logprobs is not None and out.top_logprobs is not None
    chosen = expected[torch.arange(4), torch.tensor(out.token_ids)]
    assert_close(torch.tensor(out.logprobs), chosen)
    assert [len(top) for top in out.top_logprobs] == [5, 0, 0, VOCAB]
    for row in (0, 3):
        values, indices = expected[row].topk(len(out.top_logprobs[row]))
        assert [token for token, _ in out.top_logprobs[row]] == indices.tolist()
        assert_close(torch.tensor([v for _, v in out.top_logprobs[row]]), values)


def toy_model(table: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Next-token logits that depend only on each row's own last token."""
    last = [(s.output_token_ids or s.prompt_token_ids)[-1] for s in states]
    return table[torch.tensor(last)]


def generate(sampler, table, states, steps=20):
    for _ in range(steps):
        out = sampler.sample(toy_model(table, states), states)
        for st, token in zip(states, out.token_ids):
            st.output_token_ids.append(token)
    return states


def test_a_seed_gives_the_same_tokens_whatever_else_is_in_the_batch():
    torch.manual_seed(4)
    vocab = 50
    table = torch.randn(vocab, vocab) * 1.5
    sampler = Sampler(vocab, set())

    def seeded(seed):
        return state(prompt=[1], seed=seed, temperature=0.9, top_p=0.95)

    def others():
        return [
            state(prompt=[2], temperature=1.0),
            state(prompt=[3], temperature=0.0),
            state(prompt=[4], seed=99, top_k=5),
        ]

    alone = generate(sampler, table, [seeded(7)])[0].output_token_ids
    batch_a = generate(sampler, table, [seeded(7), *others(), seeded(8)])
    batch_b = generate(sampler, table, [*others()[::-1], seeded(8), seeded(7)])
    assert batch_a[0].output_token_ids == alone
    assert batch_b[-1].output_token_ids == alone
    assert batch_a[-1].output_token_ids == batch_b[-2].output_token_ids  # seed 8 agrees too
    assert batch_a[-1].output_token_ids != alone, "different seeds should give different text"
    assert len(set(alone)) > 3, "the toy model must make the draws non-trivial"


def test_a_custom_argmax_serves_greedy_rows_and_nothing_else():
    calls = []

    def argmax(rows):
        calls.append(rows.shape)
        return rows.argmax(dim=-1)

    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    greedy = Sampler(VOCAB, {EOS}, argmax=argmax).sample(logits, [state(temperature=0.0) for _ in range(3)])
    assert greedy.token_ids == logits.argmax(dim=-1).tolist() and calls == [(3, VOCAB)]
    Sampler(VOCAB, {EOS}, argmax=argmax).sample(logits, [state(temperature=1.0, seed=1) for _ in range(3)])
    assert len(calls) == 1  # all rows sampled: no argmax over raw logits
