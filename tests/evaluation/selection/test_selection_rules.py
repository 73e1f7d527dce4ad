"""Selection rules on fixtures with known answers, and their bad input."""

from __future__ import annotations

import math

import pytest
import torch

from evaluation.selection.rules import (
    apply_rule,
    equal_size,
    quantile,
    random_order,
    threshold,
    top_k,
)

# latent:         0     1    2     3    4    5     6    7
SCORES = torch.tensor([0.5, -2.0, 3.0, -0.1, 1.0, -4.0, math.nan, 2.0])
LIVE = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)  # latent 7 is dead


def test_top_k_per_direction() -> None:
    assert top_k(SCORES, 2, "up", LIVE) == [2, 4]  # 7 (2.0) is dead, 6 is NaN
    assert top_k(SCORES, 2, "down", LIVE) == [5, 1]
    assert top_k(SCORES, 3, "abs", LIVE) == [5, 2, 1]
    assert top_k(SCORES, 1, "up") == [2]
    assert top_k(SCORES, 2, "up") == [2, 7]  # without a live mask every finite score counts


def test_ties_keep_latent_order() -> None:
    assert top_k(torch.tensor([1.0, 2.0, 2.0, 2.0]), 3, "up") == [1, 2, 3]


def test_quantile_tails() -> None:
    values = torch.arange(100, dtype=torch.float64) - 50  # -50 .. 49
    assert quantile(values, 0.95, "up") == list(range(99, 94, -1))  # 5 largest, best first
    assert quantile(values, 0.95, "down") == [0, 1, 2, 3, 4]
    # |values| >= its 0.9-quantile (45.0): -50..-45 and 45..49; ties (|-49| = |49|) by id.
    assert quantile(values, 0.9, "abs") == [0, 1, 99, 2, 98, 3, 97, 4, 96, 5, 95]


def test_threshold_and_random() -> None:
    assert threshold(SCORES, 1.0, "up", LIVE) == [2, 4]
    assert threshold(SCORES, 1.0, "down", LIVE) == [5, 1]
    assert threshold(SCORES, 2.5, "abs", LIVE) == [5, 2]
    order = random_order(SCORES, seed=3, live_F=LIVE)
    assert sorted(order) == [0, 1, 2, 3, 4, 5]
    assert order == random_order(SCORES, seed=3, live_F=LIVE)
    assert order != random_order(SCORES, seed=4, live_F=LIVE)


def test_apply_rule_dispatches() -> None:
    assert apply_rule(SCORES, "top_k", direction="down", k=1, live_F=LIVE) == [5]
    assert apply_rule(SCORES, "threshold", t=0.4, live_F=LIVE) == [2, 4, 0]


def test_equal_size_cuts_to_the_smallest_or_a_given_size() -> None:
    sets = {"dtc": [1, 2, 3, 4], "output_score": [9, 8], "random": [5, 6, 7]}
    assert equal_size(sets) == {"dtc": [1, 2], "output_score": [9, 8], "random": [5, 6]}
    assert equal_size(sets, 1)["random"] == [5]
    with pytest.raises(ValueError, match=r"subset size 3 exceeds .*'output_score': 2"):
        equal_size(sets, 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: top_k(SCORES, 2, "sideways"),
            r"unknown direction 'sideways'; valid directions: up, down, abs",
        ),
        (
            lambda: top_k(SCORES, 7, "up", LIVE),
            r"K=7 is larger than the 6 live latents with a score; choose K <= 6",
        ),
        (lambda: top_k(SCORES, 0, "up"), r"K=0 must be a positive integer"),
        (lambda: quantile(SCORES, 1.0), r"q=1.0 must lie strictly inside \(0, 1\)"),
        (lambda: quantile(SCORES, 0.0), r"q=0.0 must lie strictly inside \(0, 1\)"),
        (lambda: apply_rule(SCORES, "best"), r"unknown rule 'best'; valid rules: top_k, quantile"),
    ],
)
def test_bad_input_names_the_value_and_the_choices(call, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        call()
