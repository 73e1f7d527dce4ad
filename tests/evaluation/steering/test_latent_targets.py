"""Latent-first targets: an explained pool, uninformative explanations skipped, seeded samples."""

from __future__ import annotations

import pytest

from evaluation.steering.latent_targets import (
    ExplainedPool,
    echoes_concept,
    explained_pool,
    instructions_without_echo,
    pool_size,
    sample_latents,
    seeded_order,
)
from project.concepts import Instruction, load_instructions, sample_instructions
from project.judges import build_judge


@pytest.fixture(scope="module")
def offline_judge():
    return build_judge("offline")


def planted_explainer(asked: list[list[int]]):
    """Even latents are explained by the stop word " the", odd ones by a rare token; latent 5
    gets no explanation."""

    def explain(ask: list[int]) -> dict[int, str]:
        asked.append(list(ask))
        out = {}
        for i in ask:
            if i == 5:
                out[i] = ""
            elif i % 2 == 0:
                out[i] = '" the" (context: article, noun, phrase)'
            else:
                out[i] = f'" zebraquill{i}" (context: stripes, savanna, ink)'
        return out

    return explain


def test_explanations_of_common_tokens_are_never_steered_toward(offline_judge) -> None:
    asked: list[list[int]] = []
    pool = explained_pool(list(range(40)), 4, planted_explainer(asked), offline_judge)
    assert list(pool.explanations) == [1, 3, 7, 9]  # 5 unexplained, evens all " the"
    assert all("zebraquill" in text for text in pool.explanations.values())
    assert pool.n_uninformative >= 4 and pool.n_unexplained == 1
    assert pool.n_explained == sum(len(a) for a in asked) < 40  # stopped once the pool was full
    # Each kept explanation's token rates are logged; the rare token is in no reference window.
    assert pool.token_rates[1] == {" zebraquill1": 0.0}
    assert offline_judge.token_window_rates('" the"')[" the"] > 0.2
    metrics = pool.metrics()
    assert metrics["explain_pool_size"] == 4 and metrics["explain_uninformative"] >= 4


def test_a_prose_explanation_counts_as_informative(offline_judge) -> None:
    pool = explained_pool([0, 1], 2, lambda ask: {i: "music and songs" for i in ask}, offline_judge)
    assert list(pool.explanations) == [0, 1] and pool.n_uninformative == 0


def test_latents_are_sampled_from_the_pool_seeded_per_sae() -> None:
    pool = ExplainedPool({i: f"latent {i}" for i in range(100, 140)})
    a = sample_latents(pool, 5, seed=0, sae_key="run-a")
    assert len(a) == 5 and len(set(a)) == 5 and set(a) <= set(pool.explanations)
    assert a == sample_latents(pool, 5, seed=0, sae_key="run-a")  # reproducible
    assert a != sample_latents(pool, 5, seed=0, sae_key="run-b")  # another SAE, other latents
    assert a != sample_latents(pool, 5, seed=1, sae_key="run-a")
    assert a != list(pool.explanations)[:5]  # not the first n of the candidate order
    assert sample_latents(ExplainedPool({1: "x", 2: "y"}), 5, 0, "k") == [1, 2]


def test_pool_size_default() -> None:
    assert pool_size(0, 4) == 8 and pool_size(10, 4) == 10


def test_candidates_are_explained_in_an_order_seeded_per_sae() -> None:
    candidates = list(range(0, 4608, 3))  # one selection's candidates, best first
    a = seeded_order(candidates, 4608, seed=0, sae_key="run-a", salt="steer")
    assert sorted(a) == candidates  # the same set, reordered
    assert a == seeded_order(candidates, 4608, seed=0, sae_key="run-a", salt="steer")
    b = seeded_order(candidates, 4608, seed=0, sae_key="run-b", salt="steer")
    # Two SAEs of one width explain different latents first (they used to share the first 8).
    assert len(set(a[:8]) & set(b[:8])) <= 1
    assert a[:8] != candidates[:8]
    # A subset keeps the relative order of the full draw: a draw from all latents, restricted.
    subset = candidates[::2]
    full = seeded_order(list(range(4608)), 4608, seed=0, sae_key="run-a", salt="steer")
    assert seeded_order(subset, 4608, 0, "run-a", "steer") == [i for i in full if i in set(subset)]


def test_an_instruction_that_already_holds_the_concept_is_not_used_for_it(offline_judge) -> None:
    # Read at stop 19: latent 2101 (" order") credited on "... while keeping the order".
    concept = '" order" (context: keeping, sorted, list)'
    echo = Instruction("Remove duplicates from a list while keeping the order.", "code")
    assert echoes_concept([" order"], echo.text)
    assert not echoes_concept([" order"], "Sort these in ascending orderly fashion.")  # in-word
    pool = [*load_instructions("builtin"), echo]
    split, excluded = instructions_without_echo(
        "latent 2101", concept, pool, 8, None, 0, offline_judge
    )
    assert split is not None and excluded >= 1
    chosen = [i.text for i in (*split.dev, *split.test)]
    assert len(chosen) == 8 and not any(" order" in text for text in chosen)
    # A concept no instruction holds gets exactly the sample it always got.
    rare = '" zebraquill" (context: stripes, savanna, ink)'
    same, none_excluded = instructions_without_echo(
        "latent 7", rare, pool, 8, None, 0, offline_judge
    )
    assert none_excluded == 0 and same == sample_instructions("latent 7", pool, 8, None, 0)
    # Too few instructions left: no split, and the count says why.
    only_echo = [echo, Instruction("Put them in order.", "code")]
    assert instructions_without_echo("t", concept, only_echo, 2, None, 0, offline_judge) == (
        None,
        2,
    )
