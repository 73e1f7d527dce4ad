"""Selection scores on tiny random LMs: the batched path equals the direct one (one clean and
one intervened full forward per latent), and each criterion matches its definition."""

from __future__ import annotations

import math

import pytest
import torch

from evaluation.selection.config import SelectionConfig
from evaluation.selection.scores import (
    compute_scores,
    direct_scores,
    input_scores,
    intervened_scores,
    lens_probability,
    prefix_state,
    scan_latents,
    token_confidence,
)
from evaluation.selection.supervised import calibrated_f1, supervised_scores
from project.corpus import iter_texts, resolve_corpus, token_windows
from project.hook_cache import HookCache
from project.lm import LoadedLM, build_tiny_random_lm, residual_activations
from project.saes import SAEConfig, SparseAutoencoder, build_sae

LAYER = 1
SCAN = {"n_tokens": 1024, "context_size": 64, "input_min_examples": 2}


def _sae(d_in: int = 64, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    return build_sae(SAEConfig(architecture="topk", d_in=d_in, d_sae=192, k=8)).eval()


@pytest.fixture(scope="module")
def sae() -> SparseAutoencoder:
    return _sae()


@pytest.fixture(scope="module")
def scores(tiny_lm: LoadedLM, sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    return compute_scores(sae, tiny_lm, LAYER, SelectionConfig(**SCAN))


def _latents_to_check(
    sae: SparseAutoencoder, lm: LoadedLM, config: SelectionConfig
) -> torch.Tensor:
    """Latents firing on the prefix's last token (where "prefix" DTC is non-zero) and others."""
    state = prefix_state(sae, lm, LAYER, config.prefix)
    firing = torch.nonzero(state.f_TF[-1] > 0)[:, 0][:4]
    return torch.cat([firing, torch.tensor([0, 77, 191])]).unique()


@pytest.mark.parametrize(
    ("family", "reference", "positions"),
    [
        ("llama", "max_activation", "last"),
        ("llama", "prefix", "all"),
        ("gpt2", "max_activation", "all"),
        ("gemma2", "prefix", "last"),
    ],
)
def test_batched_equals_direct(
    tiny_lm: LoadedLM, family: str, reference: str, positions: str
) -> None:
    lm = (
        tiny_lm
        if family == "llama"
        else build_tiny_random_lm(family, n_layers=3, tokenizer=tiny_lm.tokenizer)
    )
    sae = _sae(seed=1)
    config = SelectionConfig(dtc_reference=reference, dtc_positions=positions, batch_latents=3)
    max_F = torch.rand(sae.cfg.d_sae, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    latents = _latents_to_check(sae, lm, config)
    batched = intervened_scores(
        sae, lm, LAYER, config, latents=latents, max_activation_F=max_F, hook_cache=HookCache()
    )
    direct = direct_scores(sae, lm, LAYER, config, latents, max_activation_F=max_F)
    for name, values in batched.items():
        torch.testing.assert_close(values, direct[name], atol=1e-4, rtol=0, msg=name)
        assert torch.isfinite(values).all()
    # The interventions do something measurable (the comparison is not 0 == 0).
    assert batched["dtc_in_place"].abs().max() > 1e-3
    assert batched["dtc_decoded_alone"].abs().max() > 1e-3
    assert batched["output_score"].abs().max() > 0


def test_each_score_alone_equals_it_computed_with_the_others(
    tiny_lm: LoadedLM, sae: SparseAutoencoder
) -> None:
    """scores=(name,) runs only that score's intervened pass and gives the same values."""
    config = SelectionConfig(batch_latents=7)
    latents = torch.arange(0, 96, 3)
    max_F = torch.rand(sae.cfg.d_sae, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    common = {"latents": latents, "max_activation_F": max_F, "progress": False}
    every = intervened_scores(sae, tiny_lm, LAYER, config, **common)
    for name in every:
        alone = intervened_scores(sae, tiny_lm, LAYER, config, **common, scores=(name,))
        assert list(alone) == [name]
        torch.testing.assert_close(alone[name], every[name], atol=0, rtol=0)
    with pytest.raises(ValueError, match="valid: output_score"):
        intervened_scores(sae, tiny_lm, LAYER, config, **common, scores=("dtc",))


def test_dtc_alone_does_not_build_the_logit_lens(
    tiny_lm: LoadedLM, sae: SparseAutoencoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ℓ(i) is the output score's alone: DTC selection skips the [F, |V|] lens product."""
    from evaluation.selection import scores as scores_module

    def no_lens(*args: object, **kwargs: object) -> None:
        raise AssertionError("only the output score reads the logit lens")

    monkeypatch.setattr(scores_module, "decoder_lens_tokens", no_lens)
    max_F = torch.ones(sae.cfg.d_sae)
    out = intervened_scores(
        sae,
        tiny_lm,
        LAYER,
        SelectionConfig(),
        latents=torch.arange(8),
        max_activation_F=max_F,
        progress=False,
        scores=("dtc_in_place", "dtc_decoded_alone"),
    )
    assert set(out) == {"dtc_in_place", "dtc_decoded_alone"}
    with pytest.raises(AssertionError, match="logit lens"):
        intervened_scores(
            sae, tiny_lm, LAYER, SelectionConfig(), max_activation_F=max_F, progress=False
        )


def test_literal_dtc_leaves_silent_latents_unchanged(
    tiny_lm: LoadedLM, sae: SparseAutoencoder
) -> None:
    config = SelectionConfig(dtc_reference="prefix")
    state = prefix_state(sae, tiny_lm, LAYER, config.prefix)
    silent = torch.nonzero(state.f_TF[-1] == 0)[:, 0][:5]
    out = intervened_scores(sae, tiny_lm, LAYER, config, latents=silent, progress=False)
    # Zero up to float rounding (a batch of 5 and the clean batch of 1 round differently).
    assert out["dtc_in_place"].abs().max() < 1e-6


def test_alpha_one_with_prefix_reference_is_no_intervention(
    tiny_lm: LoadedLM, sae: SparseAutoencoder
) -> None:
    # α = 1 sets every code to itself: ΔC must vanish for every latent, firing or not.
    out = intervened_scores(
        sae,
        tiny_lm,
        LAYER,
        SelectionConfig(alpha=1.0, dtc_reference="prefix", dtc_positions="all"),
        latents=torch.arange(0, 192, 6),
    )
    assert out["dtc_in_place"].abs().max() < 1e-5


def test_next_token_statistics_on_known_distributions() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    assert token_confidence(logp, 1).item() == pytest.approx(math.log(2))
    assert token_confidence(logp, 2).item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    # Lens tokens {2, 3}: best is token 2 (rank 2: two tokens more likely), p = 0.125.
    assert lens_probability(logp, torch.tensor([[3, 2]])).item() == pytest.approx(
        (1 - 2 / 4) * 0.125
    )
    assert lens_probability(logp, torch.tensor([[0, 3]])).item() == pytest.approx(0.5)


def test_input_score_counts_top_examples_whose_token_is_in_the_lens() -> None:
    # 12 examples, 3 latents. Latent 0 fires in all 12, token 7 (in its lens) in the 6 strongest;
    # latent 1 fires in 3 examples only (< min 4: NaN); latent 2 never hits its lens.
    E = 12
    max_EF = torch.zeros(E, 3)
    max_EF[:, 0] = torch.arange(E, 0, -1).float()
    max_EF[:3, 1] = 1.0
    max_EF[:, 2] = 1.0
    tok_EF = torch.full((E, 3), 5)
    tok_EF[:6, 0] = 7
    lens_FL = torch.tensor([[7, 8], [5, 9], [1, 2]])
    got = input_scores(max_EF, tok_EF, lens_FL, n_examples=10, min_examples=4)
    assert got[0].item() == pytest.approx(0.6)  # 6 of its first 10 examples
    assert math.isnan(got[1].item())
    assert got[2].item() == 0.0


def test_scan_matches_an_independent_count(tiny_lm: LoadedLM, sae: SparseAutoencoder) -> None:
    config = SelectionConfig(**SCAN)
    scan = scan_latents(sae, tiny_lm, LAYER, config)
    windows = torch.stack(
        list(
            token_windows(iter_texts(resolve_corpus("stdlib"), "eval"), tiny_lm.tokenizer, 64, 1024)
        )
    )
    f = sae.encode(residual_activations(tiny_lm, windows, LAYER).reshape(-1, 64)).float()
    # BOS, EOS (document separators) and padding never count, as in the steering table.
    tok = tiny_lm.tokenizer
    keep = ~torch.isin(
        windows.reshape(-1), torch.tensor([tok.bos_token_id, tok.eos_token_id, tok.pad_token_id])
    )
    assert not keep.all()
    f = f[keep]
    torch.testing.assert_close(scan["max_activation"], f.max(dim=0).values.clamp_min(0))
    torch.testing.assert_close(scan["firing_frequency"], (f > 0).float().mean(dim=0))
    assert scan["example_max_EF"].shape == (len(windows) * 2, sae.cfg.d_sae)


def test_compute_scores_gives_every_column(
    scores: dict[str, torch.Tensor], sae: SparseAutoencoder
) -> None:
    F = sae.cfg.d_sae
    for name in (
        "max_activation",
        "firing_frequency",
        "input_score",
        "output_score",
        "dtc_in_place",
        "dtc_decoded_alone",
    ):
        assert scores[name].shape == (F,), name
    live = scores["firing_frequency"] > 0
    assert live.any()
    assert torch.isfinite(scores["input_score"]).any()
    assert (
        (scores["input_score"][torch.isfinite(scores["input_score"])] >= 0)
        & (scores["input_score"][torch.isfinite(scores["input_score"])] <= 1)
    ).all()
    assert scores["lens_FL"].shape == (F, 20)


def test_calibrated_f1() -> None:
    tp, fp, fn = torch.tensor([30.0]), torch.tensor([10.0]), torch.tensor([20.0])
    plain = 2 * 30 / (2 * 30 + 10 + 20)
    # π0 = π makes c = 1: the ordinary F1.
    assert calibrated_f1(tp, fp, fn, 0.2, 0.2).item() == pytest.approx(plain)
    c = 0.2 * (1 - 1e-3) / (1e-3 * 0.8)
    assert calibrated_f1(tp, fp, fn, 0.2, 1e-3).item() == pytest.approx(60 / (60 + c * 10 + 20))
    with pytest.raises(ValueError, match="π0=0"):
        calibrated_f1(tp, fp, fn, 0.2, 0.0)


def test_supervised_scores_count_firing_on_labelled_tokens(
    tiny_lm: LoadedLM, sae: SparseAutoencoder
) -> None:
    positives = ["def parse(text): return the parsed value of the text"] * 4
    negatives = ["The weather in spring is mild and the days grow longer."] * 4
    result = supervised_scores(sae, tiny_lm, LAYER, positives, negatives, min_support=5)
    ids = tiny_lm.tokenizer(positives[0], return_tensors="pt").input_ids
    fired = sae.encode(residual_activations(tiny_lm, ids, LAYER)[0]) > 0
    torch.testing.assert_close(result.support_F, fired.sum(dim=0) * 4)
    finite = torch.isfinite(result.f1_F)
    assert torch.equal(finite, result.support_F >= 5)
    assert finite.any() and (result.f1_F[finite] <= 1).all()
    assert result.pi0 in (1e-3, 1e-4, 1e-2, 1e-1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"dtc_reference": "mean"},
            r"unknown dtc_reference 'mean'; valid choices: max_activation, prefix",
        ),
        ({"dtc_positions": "first"}, r"unknown dtc_positions 'first'; valid choices: last, all"),
        ({"k": 0}, r"k=0 must be an integer >= 1"),
        ({"alpha": -1.0}, r"alpha=-1.0 must be >= 0"),
        ({"prefix": " "}, r"prefix=' ' must be a non-empty text"),
        ({"input_min_examples": 200}, r"input_min_examples=200 exceeds input_examples=100"),
    ],
)
def test_bad_config_is_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SelectionConfig(**overrides)
