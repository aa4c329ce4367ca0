"""tokenize_audio.encoding.length_batches: the one batching rule of codec encoding and likelihood scoring."""

import random

from tokenize_audio.encoding import length_batches


def test_batches_stay_within_the_budget_in_the_asked_order():
    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.randint(1, 400) for _ in range(rng.randint(0, 50))]
        budget = rng.randint(1, 2000)
        for longest_first in (False, True):
            batches = length_batches(lengths, budget, longest_first)
            flat = [i for b in batches for i in b]
            assert sorted(flat) == list(range(len(lengths)))  # every item once
            seen = [lengths[i] for i in flat]
            assert seen == sorted(seen, reverse=longest_first)
            for b in batches:  # padded size within the budget, or an item too long for it alone
                assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= budget
            for b, nxt in zip(batches, batches[1:]):  # greedy: the next item would not have fitted
                assert max(lengths[i] for i in b + nxt[:1]) * (len(b) + 1) > budget


def test_longest_first_is_the_evaluation_rule():
    """Evaluation always took the longest clips first, as many as fit the budget at that length (its codes and
    scores stay bit-identical)."""
    assert length_batches([3, 9, 5, 9, 1], 20, longest_first=True) == [[1, 3], [2, 0, 4]]
    assert length_batches([3, 9, 5, 9, 1], 20) == [[4, 0, 2], [1, 3]]
