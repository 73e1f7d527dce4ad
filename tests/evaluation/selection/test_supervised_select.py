"""Supervised select-and-label per concept (METHODS §4): a latent planted to fire exactly on a
concept's positive tokens is found first; K > 1 latents are steered as the sum of their pushes;
bad input is refused before any work."""

from __future__ import annotations

import pytest
import torch

from evaluation.selection.supervised import ConceptLatents, select_and_label
from evaluation.steering.config import SteerConfig
from evaluation.steering.protocol import (
    Row,
    Target,
    plan_generations,
    supervised_method,
    supervised_table,
)
from project.concepts import Instruction
from project.saes import SAEConfig, build_sae

D, F, PLANTED = 32, 48, 7


def _planted_sae() -> torch.nn.Module:
    """A ReLU SAE whose latent PLANTED reads direction u with a bias that keeps it silent on
    anything without u; the other latents are random and fire on everything now and then."""
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="relu", d_in=D, d_sae=F))
    u = torch.zeros(D)
    u[0] = 1.0
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc[:, PLANTED] = 3.0 * u
        sae.b_enc[PLANTED] = -6.0  # fires only where the u-component exceeds 2
        sae.W_enc[0, [i for i in range(F) if i != PLANTED]] = 0.0  # the others ignore u
    return sae


def _examples(n_pos_texts: int = 6, n_neg_texts: int = 6, tokens: int = 20):
    """Activations of positive texts (every token carries 5·u) and negative texts (none),
    and the index of each token's text."""
    generator = torch.Generator().manual_seed(1)
    acts, owners = [], []
    for text in range(n_pos_texts + n_neg_texts):
        x = torch.randn(tokens, D, generator=generator)
        x[:, 0] = 5.0 if text < n_pos_texts else 0.0
        acts.append(x)
        owners.append(torch.full((tokens,), text))
    return torch.cat(acts), torch.cat(owners)


def test_select_and_label_finds_the_latent_planted_on_the_positive_tokens() -> None:
    sae = _planted_sae()
    acts_ND, text_N = _examples()
    chosen = select_and_label(sae, acts_ND, text_N, "u-ness", range(6), range(6, 12), k=3)
    assert chosen.latents[0] == PLANTED
    assert chosen.f1[0] == pytest.approx(1.0)  # every positive token, no negative one
    assert chosen.support[0] == 6 * 20 and not chosen.support_fallback
    assert len(chosen.latents) == 3 and list(chosen.f1) == sorted(chosen.f1, reverse=True)
    assert chosen.concept == "u-ness"
    # Among candidates without the planted latent, another is chosen.
    others = [i for i in range(F) if i != PLANTED]
    assert (
        PLANTED
        not in select_and_label(
            sae, acts_ND, text_N, "u", range(6), range(6, 12), 1, others
        ).latents
    )


def test_support_filter_falls_back_and_says_so() -> None:
    sae = _planted_sae()
    acts_ND, text_N = _examples()
    chosen = select_and_label(
        sae, acts_ND, text_N, "u", range(6), range(6, 12), k=1, min_support=10_000
    )
    assert chosen.support_fallback and chosen.latents == (PLANTED,)


@pytest.mark.parametrize(
    ("positives", "negatives", "k", "message"),
    [
        ((), range(6, 12), 1, "no positive texts"),
        (range(6), (), 1, "no negative texts"),
        (range(6), range(6, 12), 0, "K=0"),
    ],
)
def test_select_and_label_refuses_bad_input(positives, negatives, k, message) -> None:
    sae = _planted_sae()
    acts_ND, text_N = _examples()
    with pytest.raises(ValueError, match=message):
        select_and_label(sae, acts_ND, text_N, "u", positives, negatives, k)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"supervised_k": (0,)}, "K=0"),
        ({"supervised_k": (1, 1)}, "repeats"),
        ({"supervised_k": (1,), "mode": "latent"}, "needs mode=concept"),
        ({"supervised_min_support": 0}, "supervised_min_support"),
    ],
)
def test_steer_config_refuses_bad_supervised_settings(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SteerConfig(**kwargs)


def test_k_latents_are_steered_as_the_sum_of_their_pushes() -> None:
    sae = _planted_sae()
    target = Target("c", "c", None, latent=1, max_activation=2.0)
    target.supervised[2] = ConceptLatents("c", (3, 5), (0.9, 0.8), (60, 55), 1e-3, False)
    target.latent_scales = {1: 2.0, 3: 4.0, 5: 0.5}
    config = SteerConfig(supervised_k=(2,), factors=(3.0,))
    instruction = Instruction("Say hi.", "text")
    rows = [Row(supervised_method(2), 0, instruction, "dev", 3.0, instruction.text)]
    plan = plan_generations(rows, [target], sae, D, config, reference_scale=1.0)
    (vector,) = plan.add_vectors
    unit = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    assert torch.allclose(vector, 3.0 * (4.0 * unit[3] + 0.5 * unit[5]), atol=1e-6)
    table = supervised_table([target])
    assert table["latent"] == [3, 5] and table["rank"] == [1, 2]
    assert table["label"] == ["c", "c"] and table["method"] == ["sae_sup_k2"] * 2
