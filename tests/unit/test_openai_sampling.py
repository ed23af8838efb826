"""OpenAI-style sampling extras: presence / frequency penalties and min_tokens against their
per-row reference twins, top logprobs against a direct computation, and through the engine."""

from __future__ import annotations

import math
import random

import pytest
import torch

from loraplex.server.engine.penalties import (apply_min_tokens, apply_min_tokens_reference,
                                              apply_presence_frequency, apply_presence_frequency_reference)
from loraplex.server.engine.sampling import Sampler
from loraplex.server.engine.sequence import SamplingParams, Sequence

VOCAB = 300


def _seqs(rng: random.Random, count: int) -> list[Sequence]:
    seqs = []
    for i in range(count):
        sampling = SamplingParams(
            max_new_tokens=50, presence_penalty=rng.choice([0.0, 0.5, -1.0, 2.0]),
            frequency_penalty=rng.choice([0.0, 0.3, -0.7, 1.5]), min_tokens=rng.choice([0, 3, 10]),
            stop_token_ids=tuple(rng.sample(range(VOCAB), rng.randint(0, 2))), ignore_eos=rng.random() < 0.2)
        seq = Sequence(i, [rng.randrange(VOCAB) for _ in range(5)], sampling, eos_token_ids=(2, 7))
        seq.output_token_ids = [rng.randrange(20) for _ in range(rng.randint(0, 12))]   # many repeats
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("seed", range(5))
def test_presence_frequency_matches_reference(seed):
    rng = random.Random(seed)
    seqs = _seqs(rng, 9)
    logits = torch.randn(len(seqs), VOCAB, generator=torch.Generator().manual_seed(seed))
    fast = apply_presence_frequency(logits, seqs)
    torch.testing.assert_close(fast, apply_presence_frequency_reference(logits, seqs), rtol=0, atol=1e-5)
    assert not torch.equal(fast, logits)        # the draw has penalized rows: the test can fail


@pytest.mark.parametrize("seed", range(5))
def test_min_tokens_matches_reference(seed):
    rng = random.Random(seed)
    seqs = _seqs(rng, 9)
    logits = torch.randn(len(seqs), VOCAB, generator=torch.Generator().manual_seed(seed))
    fast = apply_min_tokens(logits, seqs)
    assert torch.equal(fast, apply_min_tokens_reference(logits, seqs))
    for i, seq in enumerate(seqs):
        below = seq.num_output_tokens < seq.sampling.min_tokens
        eos_masked = all(fast[i, t] == float("-inf") for t in seq.eos_token_ids)
        assert eos_masked == (below and not seq.sampling.ignore_eos)


def test_penalties_are_openai_semantics():
    logits = torch.zeros(1, 8)
    seq = Sequence(0, [5, 5, 5], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    seq.output_token_ids = [3, 3, 4]
    out = apply_presence_frequency(logits, [seq])[0]
    assert out[3].item() == pytest.approx(-(0.5 + 2 * 0.25))
    assert out[4].item() == pytest.approx(-(0.5 + 0.25))
    assert out[5].item() == 0.0                  # prompt tokens are not penalized (OpenAI)


def test_greedy_sampler_avoids_penalized_token():
    logits = torch.zeros(2, 10)
    logits[:, 4] = 1.0
    logits[:, 6] = 0.9
    plain = Sequence(0, [1], SamplingParams())
    penalized = Sequence(1, [1], SamplingParams(presence_penalty=0.5))
    plain.output_token_ids = penalized.output_token_ids = [4]
    result = Sampler(10)(logits, [plain, penalized])
    assert result.token_ids == [4, 6]


def test_min_tokens_blocks_eos_then_allows_it():
    logits = torch.zeros(1, 10)
    logits[0, 2] = 5.0                           # EOS is the clear favourite
    seq = Sequence(0, [1], SamplingParams(min_tokens=2), eos_token_ids=(2,))
    sampler = Sampler(10)
    assert sampler(logits, [seq]).token_ids != [2]
    seq.output_token_ids = [3, 3]
    assert sampler(logits, [seq]).token_ids == [2]


def test_top_logprobs_greedy_and_restricted_rows():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, VOCAB, generator=gen) * 3
    seqs = [Sequence(0, [1], SamplingParams(top_logprobs=5)),
            Sequence(1, [1], SamplingParams(temperature=0.7, top_k=3, seed=11, top_logprobs=5)),
            Sequence(2, [1], SamplingParams(temperature=1.3, seed=5))]            # did not ask
    result = Sampler(VOCAB)(logits, seqs)
    assert result.top_logprobs is not None and result.logprobs is not None
    greedy, restricted, none = result.top_logprobs
    expected = torch.log_softmax(logits[0], -1).topk(5)
    assert [t for t, _ in greedy] == expected.indices.tolist()
    assert [v for _, v in greedy] == pytest.approx(expected.values.tolist(), abs=1e-6)
    assert greedy[0] == (result.token_ids[0], pytest.approx(result.logprobs[0], abs=1e-6))
    assert len(restricted) == 3                                  # top_k cut: only 3 tokens survive
    assert math.fsum(math.exp(v) for _, v in restricted) == pytest.approx(1.0, abs=1e-5)
    chosen = dict(restricted)[result.token_ids[1]]
    assert chosen == pytest.approx(result.logprobs[1], abs=1e-5)
    assert none == ()


def test_engine_returns_top_logprobs_and_penalties(tiny_llama_dir):
    from engine_helpers import greedy_request, make_engine, run_staggered, tokens_of

    engine = make_engine(tiny_llama_dir, cpu_kernels="torch")
    prompt = [1, 504, 3458, 6354, 30, 1789, 1003]
    outputs = run_staggered(engine, [
        (0, greedy_request("top", prompt, 6, top_logprobs=3, ignore_eos=True)),
        (0, greedy_request("plain", prompt, 6, ignore_eos=True)),
        (1, greedy_request("penalized", prompt, 6, frequency_penalty=2.0, presence_penalty=2.0, ignore_eos=True)),
    ])
    top = outputs["top"]
    alternatives = [alt for out in top for alt in out.top_logprobs]
    logprobs = [lp for out in top for lp in out.logprobs]
    assert tokens_of(top) == tokens_of(outputs["plain"])         # asking for logprobs changes nothing
    assert len(alternatives) == len(logprobs) == 6
    for token, lp, alts in zip(tokens_of(top), logprobs, alternatives):
        assert len(alts) == 3 and alts[0][0] == token and alts[0][1] == pytest.approx(lp, abs=1e-5)
        assert alts[0][1] >= alts[1][1] >= alts[2][1]
    penalized = tokens_of(outputs["penalized"])
    assert len(set(penalized)) == len(penalized)                 # a 2.0 presence penalty forbids repeats here
