"""Sampling: greedy, temperature, top-k / top-p / min-p, penalties, seeds, logprobs and constraints."""

import math

import pytest
import torch

from kimi_k2.engine.params import SamplingParams
from kimi_k2.engine.sampler import apply_constraints_and_penalties, filter_logits, sample
from kimi_k2.engine.sequence import Sequence


def seqs_for(*params, completion=()):
    out = []
    for i, p in enumerate(params):
        s = Sequence(f"r{i}", 0, [0], p)
        s.token_ids += list(completion)
        out.append(s)
    return out


def test_greedy_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    tokens, lps, errors = sample(logits.clone(), seqs_for(*[SamplingParams(temperature=0)] * 5))
    assert tokens == logits.argmax(-1).tolist() and lps == [None] * 5 and errors == [None] * 5


def test_filters_keep_the_expected_sets():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    x = probs.log()
    one = torch.ones(1)

    def kept(top_k=0, top_p=1.0, min_p=0.0):
        y = filter_logits(x, torch.tensor([top_k]), one * top_p, one * min_p)
        return torch.isfinite(y[0]).nonzero().flatten().tolist()

    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.5) == [0]
    assert kept(top_p=0.7) == [0, 1]
    assert kept(top_p=0.9) == [0, 1, 2]
    assert kept(min_p=0.5) == [0, 1]  # 0.15 < 0.5 * 0.5
    assert kept(top_k=3, top_p=0.83) == [0, 1]  # renormalized top-3: 0.526 + 0.316 >= 0.83 (raw: 0.8)


def test_sampled_frequencies_match_the_distribution():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    p = SamplingParams(temperature=1.0, seed=123)
    s = seqs_for(p)
    counts = torch.zeros(4)
    draws = 4000
    for _ in range(draws):
        tok, _, _ = sample(probs.log()[None].clone(), s)
        counts[tok[0]] += 1
    freq = counts / draws
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_temperature_sharpens_and_seed_reproduces():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])

    def run(seed, temperature=1.0, k=200):
        s = seqs_for(SamplingParams(temperature=temperature, seed=seed))
        return [sample(logits.clone(), s)[0][0] for _ in range(k)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(1, temperature=0.05).count(0) == 200


def test_seed_is_independent_of_batch_neighbours():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    alone = sample(logits[1:2].clone(), seqs_for(SamplingParams(seed=5)))[0][0]
    batch = seqs_for(SamplingParams(seed=99), SamplingParams(seed=5), SamplingParams(temperature=0))
    assert sample(logits.clone(), batch)[0][1] == alone


def test_presence_and_frequency_penalties():
    logits = torch.zeros(1, 6)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    assert apply_constraints_and_penalties(logits, seqs_for(p, completion=[2, 2, 3])) == [None]
    assert logits[0].tolist() == pytest.approx([0, 0, -(0.5 + 0.5), -(0.5 + 0.25), 0, 0])


def test_logprobs_and_top_logprobs():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    tokens, lps, _ = sample(logits.clone(), seqs_for(SamplingParams(temperature=0, logprobs=2)))
    ref = logits.log_softmax(-1)[0]
    lp = lps[0]
    assert tokens == [1] and lp.token_id == 1 and lp.logprob == pytest.approx(float(ref[1]))
    assert [t for t, _ in lp.top] == [1, 2] and lp.top[1][1] == pytest.approx(float(ref[2]))
    assert math.isclose(sum(math.exp(v) for v in ref.tolist()), 1.0, rel_tol=1e-6)


class OnlyEven:
    """A real TokenConstraint: only even token ids until three tokens were chosen."""

    def __init__(self, vocab=10):
        self.mask = torch.arange(vocab) % 2 == 0
        self.seen: list[int] = []

    def allowed(self):
        return self.mask

    def advance(self, token_id):
        self.seen.append(token_id)

    def is_finished(self):
        return len(self.seen) >= 3


def test_constraint_masks_greedy_and_random():
    logits = torch.zeros(2, 10)
    logits[:, 1] = 10.0  # odd favourite
    batch = seqs_for(SamplingParams(temperature=0, constraint=OnlyEven), SamplingParams(seed=0, constraint=OnlyEven))
    for _ in range(20):
        tokens, _, _ = sample(logits.clone(), batch)
        assert all(t % 2 == 0 for t in tokens)


def test_a_failing_constraint_fails_only_its_own_sequence():
    class Nothing(OnlyEven):
        def allowed(self):
            return torch.zeros(10, dtype=torch.bool)

    class Broken(OnlyEven):
        def allowed(self):
            raise RuntimeError("grammar engine error")

    logits = torch.zeros(4, 10)
    logits[:, 3] = 5.0
    batch = seqs_for(SamplingParams(temperature=0), SamplingParams(constraint=Nothing),
                     SamplingParams(temperature=0, constraint=OnlyEven), SamplingParams(constraint=Broken))
    tokens, _, errors = sample(logits, batch)
    assert errors[0] is None and errors[2] is None
    assert "allows no token" in errors[1] and "grammar engine error" in errors[3]
    assert tokens[0] == 3 and tokens[2] % 2 == 0


def test_logit_bias_adds_to_the_logits_and_bans():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3)
    params = [SamplingParams(temperature=0, logit_bias={3: 5.0}),  # -1 + 5 = 4: now the largest
              SamplingParams(temperature=0, logit_bias={0: float("-inf")}),  # banned: the next one wins
              SamplingParams(temperature=0, logit_bias={0: float("-inf"), 1: float("-inf"), 2: float("-inf"),
                                                        3: float("-inf")})]  # nothing left: that sequence fails
    tokens, _, errors = sample(logits.clone(), seqs_for(*params))
    assert tokens[:2] == [3, 1] and errors[:2] == [None, None]
    assert errors[2] is not None and "logit_bias" in errors[2]
