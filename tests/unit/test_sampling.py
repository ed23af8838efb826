"""Batched sampler: greedy, seeds, distribution, top-k/top-p, repetition penalty, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from loraplex.server.engine import sampling
from loraplex.server.engine.sampling import (Sampler, apply_repetition_penalty, counter_uniform,
                                             mask_candidates, mask_top_k_top_p, top_candidates)
from loraplex.server.engine.sequence import SamplingParams, Sequence

VOCAB = 64


def seq(seq_id: int = 0, prompt: list[int] | None = None, output: list[int] | None = None,
        **sampling) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=list(prompt or [1, 2, 3]),
                    sampling=SamplingParams(**sampling), output_token_ids=list(output or []))


def random_logits(n: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic over tokens with non-zero expected probability, and its dof."""
    total = counts.sum().item()
    support = probs > 0
    expected = probs[support] * total
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    return stat, int(support.sum().item()) - 1


def assert_matches_distribution(tokens: list[int], probs: torch.Tensor) -> None:
    counts = torch.bincount(torch.tensor(tokens), minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "sampled a token outside the allowed set"
    stat, dof = chi_square(counts, probs.double())
    assert stat < dof + 8 * math.sqrt(2 * dof), f"chi-square {stat:.1f} too large for {dof} dof"


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """softmax(logits / T) restricted by top-k then top-p, via transformers' warpers."""
    scores = logits[None, :] / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores[0], dim=-1)


def test_greedy_rows_are_argmax_of_raw_logits():
    logits = random_logits(8)
    result = Sampler(VOCAB)(logits, [seq(i) for i in range(8)])
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.logprobs is None


def test_mixed_batch_greedy_rows_unaffected_by_sampled_rows():
    logits = random_logits(6)
    seqs = [seq(i, temperature=(1.0 if i % 2 else 0.0), top_k=(5 if i == 3 else 0)) for i in range(6)]
    result = Sampler(VOCAB, seed=1)(logits, seqs)
    greedy_rows = [0, 2, 4]
    assert [result.token_ids[i] for i in greedy_rows] == logits[greedy_rows].argmax(-1).tolist()
    assert result.token_ids[3] in logits[3].topk(5).indices.tolist()


def test_seeded_rows_are_independent_of_batch_composition_and_order(candidates):
    target_logits = random_logits(1, seed=7)[0]

    def run(batch_logits: torch.Tensor, seqs: list[Sequence], sampler_seed: int) -> list[int]:
        return Sampler(VOCAB, seed=sampler_seed)(batch_logits, seqs).token_ids

    for step in range(5):
        output = list(range(step))
        target = seq(99, output=output, temperature=1.3, top_p=0.95, seed=1234)
        others = random_logits(4, seed=step + 100)
        alone = run(target_logits[None], [target], 0)[0]
        first = run(torch.cat([target_logits[None], others]),
                    [target] + [seq(i, temperature=1.0) for i in range(4)], 1)[0]
        last = run(torch.cat([others[:2], target_logits[None]]),
                   [seq(i, temperature=0.5, seed=i) for i in range(2)] + [target], 2)[2]
        assert alone == first == last


def test_seeded_stream_depends_on_seed_and_step():
    logits = torch.zeros(1, 1000)                     # uniform: every draw is pure noise
    draws = {(s, step): Sampler(1000)(logits, [seq(output=[0] * step, temperature=1.0, seed=s)]).token_ids[0]
             for s in range(4) for step in range(4)}
    assert len(set(draws.values())) >= 14             # 16 draws from 1000 tokens barely collide


def test_counter_uniform_is_uniform_deterministic_and_in_open_interval():
    u = torch.tensor([counter_uniform(seed, step) for seed in range(100) for step in range(100)],
                     dtype=torch.float64)
    assert 0 < u.min() and u.max() < 1
    assert counter_uniform(7, 3) == counter_uniform(7, 3) != counter_uniform(7, 4)
    counts = torch.histc(u, bins=40, min=0, max=1)
    stat, dof = chi_square(counts, torch.full((40,), 1 / 40, dtype=torch.float64))
    assert stat < dof + 8 * math.sqrt(2 * dof)
    assert counter_uniform(2**62 + 5, 2**40) != counter_uniform(5, 2**40)    # all 63 bits count


@pytest.fixture(params=[3, 256], ids=["topk-candidates", "all-candidates"])
def candidates(request, monkeypatch):
    """Run a test with the top-k pre-filter narrower than the vocab (and the fallback) or not."""
    monkeypatch.setattr(sampling, "CANDIDATES", request.param)
    return request.param


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0),
                                                     (1.0, 0, 0.8), (1.5, 6, 0.9)])
def test_unseeded_distribution_matches_processed_softmax(temperature, top_k, top_p, candidates):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 4000
    seqs = [seq(i, temperature=temperature, top_k=top_k, top_p=top_p) for i in range(n)]
    tokens = Sampler(8, seed=5)(logits.expand(n, 8).clone(), seqs).token_ids
    assert_matches_distribution(tokens, reference_probs(logits, temperature, top_k, top_p))


def test_seeded_distribution_across_seeds_matches_processed_softmax(candidates):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 4000
    seqs = [seq(i, temperature=0.9, top_k=7, top_p=0.95, seed=i) for i in range(n)]
    tokens = Sampler(8)(logits.expand(n, 8).clone(), seqs).token_ids
    assert_matches_distribution(tokens, reference_probs(logits, 0.9, 7, 0.95))


def test_seeded_distribution_across_steps_matches_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5, 2.0]])
    tokens = [Sampler(5)(logits, [seq(output=[0] * step, temperature=1.0, seed=42)]).token_ids[0]
              for step in range(3000)]
    assert_matches_distribution(tokens, torch.softmax(logits[0], -1))


def test_top_k_one_and_tiny_top_p_equal_greedy(candidates):
    logits = random_logits(32)
    sampler = Sampler(VOCAB, seed=3)
    greedy = logits.argmax(-1).tolist()
    assert sampler(logits, [seq(i, temperature=2.0, top_k=1) for i in range(32)]).token_ids == greedy
    assert sampler(logits, [seq(i, temperature=2.0, top_p=1e-6) for i in range(32)]).token_ids == greedy
    seeded = [seq(i, temperature=2.0, top_p=1e-6, seed=i) for i in range(32)]
    assert sampler(logits, seeded).token_ids == greedy


def test_mask_top_k_top_p_matches_transformers_warpers():
    logits = random_logits(6)
    top_k = [0, 1, 5, 20, 0, 3]
    top_p = [1.0, 1.0, 0.5, 0.9, 0.3, 0.99]
    k = torch.tensor([[t if t else VOCAB] for t in top_k])
    p = torch.tensor([[t] for t in top_p])
    ours = mask_top_k_top_p(logits, k, p)
    for row in range(6):
        expected = torch.log(reference_probs(logits[row], 1.0, top_k[row], top_p[row]))
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(expected)), f"row {row}"


@pytest.mark.parametrize("count", [1, 4, 16, 63])
def test_candidate_path_keeps_what_the_full_sort_keeps(count):
    """Where mask_candidates reports exact, its kept set equals mask_top_k_top_p's."""
    gen = torch.Generator().manual_seed(count)
    peaked = torch.randn(6, VOCAB, generator=gen) * 3
    peaked[:, :3] += 12                                  # nucleus of a few tokens
    flat = torch.randn(6, VOCAB, generator=gen) * 0.1    # nucleus of most of the vocab
    ties = torch.zeros(2, VOCAB)                         # every cut is a tie
    z = torch.cat([peaked, flat, ties])
    top_k = torch.tensor([[k] for k in [VOCAB, 2, 5, VOCAB, 40, 1] * 2 + [VOCAB, 3]])
    top_p = torch.tensor([[p] for p in [0.9, 1.0, 0.5, 0.99, 0.95, 0.3] * 2 + [0.5, 1.0]])
    reference = mask_top_k_top_p(z, top_k, top_p)
    values, ids, clean = top_candidates(z, count)
    masked, exact = mask_candidates(z, values, top_k, top_p)
    for row in range(z.shape[0]):
        if not (clean[row] and exact[row]):
            continue
        kept = set(ids[row][torch.isfinite(masked[row])].tolist())
        assert kept == set(torch.nonzero(torch.isfinite(reference[row])).flatten().tolist()), row
    # Peaked rows (three tokens hold ~all the mass) take the fast path unless top-k reaches past
    # the candidates (its softmax normaliser then needs tokens they do not hold) or the
    # candidates hold less than top_p (fewer than the three peaks).
    expected_fast = [k <= count or (k == VOCAB and count >= 3) for k in top_k[:6, 0].tolist()]
    assert (clean & exact)[:6].tolist() == expected_fast
    assert not bool(clean[12:].any()) or count >= VOCAB          # ties across the cut fall back


def test_sampling_cost_is_linear_in_the_vocab_not_a_sort():
    """A 49k vocab at temperature + top-p: the top-k pre-filter, not a full sort, picks rows."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 49152, generator=gen)
    logits[:, :5] += 15
    seqs = [seq(i, temperature=0.8, top_p=0.9, seed=i) for i in range(16)]
    values, ids, clean = top_candidates(logits / 0.8, sampling.CANDIDATES)
    _, exact = mask_candidates(logits / 0.8, values, torch.full((16, 1), 49152), torch.full((16, 1), 0.9))
    assert bool((clean & exact).all())
    tokens = Sampler(49152)(logits, seqs).token_ids
    assert all(t < 5 for t in tokens)


def test_repetition_penalty_matches_transformers_processor():
    logits = random_logits(3)
    seqs = [seq(0, prompt=[1, 5, 5, 9], output=[12, 40], repetition_penalty=1.3),
            seq(1, prompt=[2, 3], output=[], repetition_penalty=1.0),
            seq(2, prompt=[7, 63, 0], output=[7, 8, 9, 10], repetition_penalty=0.8)]
    ours = apply_repetition_penalty(logits, seqs)
    for i, s in enumerate(seqs):
        ids = torch.tensor([s.all_token_ids])
        processor = RepetitionPenaltyLogitsProcessor(s.sampling.repetition_penalty)
        expected = processor(ids, logits[i:i + 1].clone())
        torch.testing.assert_close(ours[i], expected[0], rtol=0, atol=0)


def test_greedy_with_repetition_penalty_is_argmax_of_penalized_logits():
    logits = torch.tensor([[5.0, 4.9, 1.0, -2.0]])
    s = seq(prompt=[0], repetition_penalty=1.2)
    assert Sampler(4)(logits, [s]).token_ids == [1]


def test_logprobs_match_log_softmax_of_processed_distribution():
    logits = random_logits(3)
    seqs = [seq(0, logprobs=True), seq(1, temperature=0.7, logprobs=True),
            seq(2, temperature=1.2, top_k=4, seed=9)]
    result = Sampler(VOCAB, seed=0)(logits, seqs)
    assert result.logprobs is not None
    expected = [torch.log_softmax(logits[0], -1),
                torch.log_softmax(logits[1] / 0.7, -1),
                torch.log(reference_probs(logits[2], 1.2, 4, 1.0))]
    for row, tok in enumerate(result.token_ids):
        assert math.isclose(result.logprobs[row], expected[row][tok].item(), abs_tol=1e-5)


def test_rejects_logits_of_the_wrong_shape():
    with pytest.raises(ValueError, match="num_seqs=2"):
        Sampler(VOCAB)(random_logits(3), [seq(0), seq(1)])


@pytest.mark.gpu
def test_cuda_matches_cpu_for_greedy_and_seeded_rows():
    logits = random_logits(16)
    seqs = [seq(i, output=[0] * i, temperature=(0.0 if i % 3 == 0 else 0.9), top_p=0.9,
                top_k=(10 if i % 2 else 0), seed=i, repetition_penalty=1.1, logprobs=True)
            for i in range(16)]
    cpu = Sampler(VOCAB)(logits, seqs)
    cuda = Sampler(VOCAB, device="cuda")(logits.cuda(), seqs)
    assert cuda.token_ids == cpu.token_ids
    assert cuda.logprobs == pytest.approx(cpu.logprobs, abs=1e-4)


def test_rows_padded_for_a_resized_vocabulary_never_pick_past_their_width():
    """A step holding a resized-vocabulary adapter widens every row's logits; rows of other
    adapters carry -inf past the base's vocabulary: no sampling mode picks those ids, and their
    (top) logprobs are those of their own vocabulary."""
    wide, extra = VOCAB + 16, torch.full((1, 16), float("-inf"))
    base_rows = random_logits(6, seed=3)
    logits = torch.cat([base_rows, extra.expand(6, 16)], dim=1)                   # [6, V + 16]
    modes = [dict(), dict(temperature=1.0), dict(temperature=2.0, top_p=0.5), dict(temperature=1.0, top_k=5),
             dict(temperature=1.5, repetition_penalty=1.3), dict(temperature=0.7, logprobs=True, top_logprobs=3)]
    seqs = [seq(i, output=[VOCAB - 1], **mode) for i, mode in enumerate(modes)]
    sampler = Sampler(wide)
    for _ in range(50):
        result = sampler(logits, seqs)
        assert all(t < VOCAB for t in result.token_ids)
    plain = Sampler(VOCAB)(base_rows[:1], seqs[:1]).token_ids
    assert Sampler(wide)(logits[:1], seqs[:1]).token_ids == plain              # greedy: the same choice
    lp = Sampler(wide, seed=1)(logits[5:], seqs[5:])
    want = torch.log_softmax(base_rows[5] / 0.7, dim=-1)[lp.token_ids[0]]
    assert math.isclose(lp.logprobs[0], float(want), rel_tol=1e-5)
