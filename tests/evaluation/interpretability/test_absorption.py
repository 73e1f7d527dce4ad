from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import sparse

from evaluation.interpretability.absorption import (
    AbsorptionConfig,
    _absorption,
    _fit_probe,
    _k_sparse_f1,
    _prefix_ids,
    _rank_by_l1_probe,
    _select_words,
    _word_activations,
    compute,
)
from evaluation.interpretability.schema import EvalOutput
from project.lm import LoadedLM, load_lm, residual_activations
from project.saes import SAEConfig, build_sae

SMALL = {
    "max_tokens_per_letter": 24,
    "min_tokens_per_letter": 12,
    "max_k_value": 3,
    "n_icl_examples": 3,
}


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_compute_is_well_formed(tiny_lm: LoadedLM, architecture: str) -> None:
    torch.manual_seed(0)
    k = {"k": 8} if architecture == "topk" else {}
    sae = build_sae(SAEConfig(architecture=architecture, d_in=tiny_lm.d_model, d_sae=128, **k))
    out = compute(sae, tiny_lm, 2, AbsorptionConfig(**SMALL))
    assert isinstance(out, EvalOutput)
    metrics = out.metrics["mean"]
    assert all(math.isfinite(v) for v in metrics.values())
    for name in ("mean_absorption_fraction_score", "mean_full_absorption_score"):
        assert 0.0 <= metrics[name] <= 1.0
    assert 1.0 <= metrics["mean_num_split_features"] <= 3.0
    letter_latents = out.metrics["first_letter_latents"]
    assert 0.0 <= letter_latents["mean_main_latents_test_f1"] <= 1.0
    for category, name in (
        ("mean", "mean_absorption_fraction_score"),
        ("mean", "mean_full_absorption_score"),
        ("first_letter_latents", "mean_main_latents_test_f1"),
    ):
        values = out.metrics[category]
        assert values[f"{name}_ci_low"] <= values[name] <= values[f"{name}_ci_high"], name
    f1 = [d["main_latents_test_f1"] for d in out.details]
    if max(f1) > min(f1):  # letters differ: the interval has a width
        assert letter_latents["mean_main_latents_test_f1_ci_high"] > min(f1)
        assert letter_latents["mean_main_latents_test_f1_ci_low"] < max(f1)
    assert letter_latents["mean_probe_test_f1"] > 0.0
    letters = [d["first_letter"] for d in out.details]
    assert letters == sorted(letters) and len(letters) >= 20
    for detail in out.details:
        assert 1 <= detail["num_split_features"] == len(detail["split_features"]) <= 3
        assert detail["num_full_absorption"] <= detail["num_probe_true_positives"] <= 12
        if detail["num_probe_true_positives"]:
            assert 0.0 <= detail["mean_absorption_fraction"] <= 1.0
    assert out.unstructured["n_words"] == 24 * len(letters)


def test_cached_prefix_matches_full_prompts(tiny_lm: LoadedLM) -> None:
    config = AbsorptionConfig(**SMALL)
    words = _select_words(tiny_lm, config)
    prefix = _prefix_ids(tiny_lm, config, words.icl_ids)
    assert tiny_lm.tokenizer.decode(prefix).count("has the first letter:") == 3
    word_ids = words.token_ids[:7]
    cached_ND = _word_activations(tiny_lm, 2, prefix, word_ids, batch_size=3)
    full_BT = torch.tensor([[*prefix, w] for w in word_ids])
    expected_ND = residual_activations(tiny_lm, full_BT, 2)[:, -1]
    torch.testing.assert_close(cached_ND, expected_ND, atol=1e-5, rtol=1e-4)
    # Only single-token, space-led alphabetic words of at least two letters are used.
    texts = tiny_lm.tokenizer.batch_decode([[i] for i in words.token_ids])
    assert all(t[0] == " " and t[1:].isalpha() and len(t) >= 3 for t in texts)
    assert all(t[1].lower() == words.alphabet[c] for t, c in zip(texts, words.letters, strict=True))


def test_fit_probe_returns_raw_space_weights() -> None:
    rng = np.random.default_rng(0)
    x_ND = rng.standard_normal((400, 5)) * [1.0, 10.0, 0.1, 3.0, 1.0] + [5.0, -20.0, 1.0, 0, 2]
    for y_N in (x_ND[:, 1] > -20.0, x_ND[:, 2] > 1.05):
        w_D, b = _fit_probe(x_ND, y_N, l2=1e-4)
        assert ((x_ND @ w_D + b > 0) == y_N).mean() > 0.95


def test_l1_probe_ranks_the_latent_that_predicts_the_label_first() -> None:
    """SAEBench's candidate rule: the L1 probe's weights, not the mean difference. Latent 0
    fires on every positive and on many negatives too (the largest mean difference, a poor
    classifier); latent 1 fires on positives only, weakly (smaller mean difference, perfect)."""
    rng = np.random.default_rng(0)
    n = 600
    y_N = rng.random(n) < 0.2
    f_NF = np.zeros((n, 6))
    f_NF[:, 0] = np.where(y_N | (rng.random(n) < 0.6), 5.0 + rng.random(n), 0.0)
    f_NF[:, 1] = np.where(y_N, 0.5 + 0.1 * rng.random(n), 0.0)
    f_NF[:, 2:] = rng.random((n, 4)) * (rng.random((n, 4)) < 0.3)
    mean_diff = f_NF[y_N].mean(0) - f_NF[~y_N].mean(0)
    tie_order = np.argsort(-mean_diff, kind="stable")
    assert tie_order[0] == 0  # the mean-difference rule picks the poor latent first
    ranked = _rank_by_l1_probe(sparse.csr_matrix(f_NF), y_N, 0.01, tie_order, 3)
    assert ranked[0] == 1 and len(set(ranked.tolist())) == 3
    train_N = np.arange(n) % 2 == 0
    f1 = _k_sparse_f1(f_NF, y_N, train_N, ranked)
    assert f1[0] == 1.0  # the latent that fires on positives only classifies them alone
    assert _k_sparse_f1(f_NF, y_N, train_N, tie_order[:1])[0] < 0.6
    # A strong penalty zeroes every weight: the candidates then follow the mean difference.
    zeroed = _rank_by_l1_probe(sparse.csr_matrix(f_NF), y_N, 1e4, tie_order, 3)
    assert zeroed.tolist() == tie_order[:3].tolist()


def test_absorption_formula() -> None:
    """SAEBench's rules on hand-made cases: latent 0 is the main latent, 1 an aligned absorber,
    2 a latent orthogonal to the probe."""
    config = AbsorptionConfig()
    dec_proj_F = torch.tensor([1.0, 0.8, 0.0])
    cos_F = torch.tensor([1.0, 0.8, 0.0])
    main = torch.tensor([0])
    f_NF = torch.tensor(
        [
            [2.0, 0.0, 5.0],  # the main latent carries everything: no absorption
            [0.0, 2.5, 0.0],  # the main latent is silent, the absorber carries a: full
            [1.0, 1.25, 0.0],  # half and half
            [0.0, 0.1, 3.0],  # nothing aligned carries enough: not absorption
        ]
    )
    act_proj_N = torch.tensor([2.0, 2.0, 2.0, 2.0])
    fractions, full = _absorption(act_proj_N, f_NF, dec_proj_F, cos_F, main, config)
    assert fractions == pytest.approx([0.0, 1.0, 0.5, 0.0])
    assert full == [False, True, False, False]


def test_config_validation(tiny_lm: LoadedLM) -> None:
    with pytest.raises(ValueError, match="prompt_template='{word}:' must contain"):
        AbsorptionConfig(prompt_template="{word}:")
    with pytest.raises(ValueError, match="test_fraction=0.95 must lie in"):
        AbsorptionConfig(test_fraction=0.95)
    with pytest.raises(ValueError, match="max_tokens_per_letter=5 must be >= min"):
        AbsorptionConfig(max_tokens_per_letter=5)
    with pytest.raises(ValueError, match="f1_jump_threshold=2.0 must lie in"):
        AbsorptionConfig(f1_jump_threshold=2.0)
    with pytest.raises(
        ValueError,
        match="main_latent_selection='largest' is not one of k_sparse_probe, mean_difference",
    ):
        AbsorptionConfig(main_latent_selection="largest")
    with pytest.raises(ValueError, match="k_sparse_probe_l1_decay=0 must be > 0"):
        AbsorptionConfig(k_sparse_probe_l1_decay=0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4))
    with pytest.raises(ValueError, match="SAE d_in=32 does not match"):
        compute(sae, tiny_lm, 1, AbsorptionConfig(**SMALL))
    with pytest.raises(ValueError, match="layer 4 is out of range"):
        compute(sae, tiny_lm, 4, AbsorptionConfig(**SMALL))


def _planted_sae(
    lm: LoadedLM, layer: int, config: AbsorptionConfig, letter: int, absorber_cos: float
) -> tuple[torch.nn.Module, float]:
    """A TopK (k = 1) SAE with a main latent for ``letter`` that reads the LM probe's own
    direction p, and an "absorber" latent that fires on ~40% of all words (a random direction
    u, whatever their letter) with a larger activation, so that on those c-words it wins the top
    slot and silences the main latent. Its decoder row has cosine ``absorber_cos`` with p.

    Returns the SAE and the share of the letter's test words on which the absorber fires."""
    words = _select_words(lm, config)
    prefix = _prefix_ids(lm, config, words.icl_ids)
    x_ND = _word_activations(lm, layer, prefix, words.token_ids, config.lm_batch_size)
    letters_N = torch.tensor(words.letters)
    test_N = torch.tensor(words.is_test)
    y_CN = letters_N[None, :] == torch.arange(len(words.alphabet))[:, None]
    # The same fit as compute's, so p is the direction the eval will measure against.
    w_D, b = _fit_probe(
        x_ND[~test_N].numpy().astype(np.float64), y_CN[letter, ~test_N].numpy(), config.probe_l2
    )
    w_D = torch.tensor(w_D, dtype=torch.float32)
    p_D = w_D / w_D.norm()
    cut = float(-b / w_D.norm())  # the probe fires where p·x > cut
    generator = torch.Generator().manual_seed(0)
    u_D = torch.randn(x_ND.shape[1], generator=generator)
    u_D -= (u_D @ p_D) * p_D
    u_D /= u_D.norm()
    u_cut = float((x_ND @ u_D).quantile(0.6))
    v_D = torch.randn(x_ND.shape[1], generator=generator)
    v_D -= (v_D @ p_D) * p_D + (v_D @ u_D) * u_D
    v_D /= v_D.norm()

    sae = build_sae(SAEConfig(architecture="topk", d_in=x_ND.shape[1], d_sae=8, k=1))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.zero_()
        sae.W_enc[:, 0] = p_D
        sae.b_enc[0] = -cut
        sae.W_enc[:, 1] = 100.0 * u_D
        sae.b_enc[1] = -100.0 * u_cut
        sae.b_enc[2:] = -1e6  # unused latents never fire
        sae.W_dec[0] = p_D
        sae.W_dec[1] = absorber_cos * p_D + math.sqrt(1.0 - absorber_cos**2) * v_D
        sae.W_dec[2:] = v_D
    c_test = y_CN[letter] & test_N
    share = float(((x_ND[c_test] @ u_D) > u_cut).float().mean())
    return sae.eval(), share


@pytest.mark.slow
def test_planted_absorption_is_found_and_an_orthogonal_absorber_is_not() -> None:
    """On SmolLM2, whose residual stream carries first letters (a random tiny LM's does not)."""
    lm, layer, letter = load_lm(), 4, 1
    config = AbsorptionConfig(max_tokens_per_letter=100)
    absorbing, share = _planted_sae(lm, layer, config, letter, absorber_cos=0.9)
    assert 0.15 < share < 0.7  # the plant covers some of the letter's words, not all
    detail = compute(absorbing, lm, layer, config).details[letter]
    assert detail["split_features"][0] == 0  # the main latent is the probe-direction one
    assert 1 not in detail["split_features"]  # the absorber is no split feature
    assert detail["num_probe_true_positives"] >= 20
    # Absorbed words: the main latent is silent and the absorber carries the projection.
    assert detail["mean_absorption_fraction"] > 0.1
    assert detail["full_absorption_rate"] > 0.1

    # The same plant with a decoder orthogonal to the probe absorbs nothing.
    orthogonal, _ = _planted_sae(lm, layer, config, letter, absorber_cos=0.0)
    control = compute(orthogonal, lm, layer, config).details[letter]
    assert control["split_features"][0] == 0
    assert control["mean_absorption_fraction"] == 0.0
    assert control["full_absorption_rate"] == 0.0
