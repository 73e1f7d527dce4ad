from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluation.interpretability.autointerp import (
    AutointerpConfig,
    _build_examples,
    _scan,
    _score_latent,
    _TokenText,
    compute,
    detection_scores,
    explain_latents,
)
from evaluation.interpretability.schema import EvalOutput
from project.corpus import iter_texts, region_description, resolve_corpus, token_windows
from project.judges import ChatJudge, Judge, build_judge
from project.lm import LoadedLM
from project.saes import SAEConfig, SparseAutoencoder, build_sae

LAYER = 1
SMALL = {"n_tokens": 3072, "context_size": 64, "n_latents": 4, "min_firings": 10}


@pytest.fixture(scope="module")
def random_sae(tiny_lm: LoadedLM) -> SparseAutoencoder:
    torch.manual_seed(0)
    return build_sae(SAEConfig(architecture="topk", d_in=tiny_lm.d_model, d_sae=128, k=8))


class _ScriptedChat(ChatJudge):
    """A chat judge whose "model" answers from a script: exercises the real parsing path."""

    name = "scripted"

    def __init__(self, explain: str, detect: str) -> None:
        super().__init__()
        self.answers = {"explain": explain, "detect": detect}

    def _chat(self, messages: list[dict[str, str]], max_tokens: int) -> str | None:
        first = messages[0]["content"]
        return self.answers["detect" if "comma-separated list" in first else "explain"]


def test_compute_with_offline_judge(tiny_lm: LoadedLM, random_sae: SparseAutoencoder) -> None:
    random_sae.train()
    judge = build_judge("offline")
    out = compute(random_sae, tiny_lm, LAYER, AutointerpConfig(**SMALL), judge)
    assert isinstance(out, EvalOutput)
    assert random_sae.training  # the caller's mode is restored
    metrics = out.metrics["autointerp"]
    assert set(metrics) == {
        "autointerp_score",
        "autointerp_std_dev",
        "autointerp_score_ci_low",
        "autointerp_score_ci_high",
        "autointerp_balanced_accuracy",
        "autointerp_balanced_accuracy_ci_low",
        "autointerp_balanced_accuracy_ci_high",
        "autointerp_never_fires_score",
        "autointerp_always_fires_score",
        "constant_answer_score",
        "n_latents_scored",
    }
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["autointerp_score"] <= 1.0
    score = metrics["autointerp_score"]
    assert metrics["autointerp_score_ci_low"] <= score <= metrics["autointerp_score_ci_high"]
    never, always = (
        metrics["autointerp_never_fires_score"],
        metrics["autointerp_always_fires_score"],
    )
    assert never + always == pytest.approx(1.0)
    assert metrics["constant_answer_score"] == max(never, always)
    assert 0.0 <= metrics["autointerp_std_dev"] <= 1.0
    assert metrics["n_latents_scored"] == 4
    table = out.tables["autointerp_explanations"]
    assert set(table) >= {"latent", "explanation", "score", "max_activation"}
    assert len({len(column) for column in table.values()}) == 1
    assert len(set(table["latent"])) == 4
    assert all(isinstance(e, str) and e for e in table["explanation"])
    assert all(0.0 <= s <= 1.0 for s in table["score"])
    assert all(m > 0 for m in table["max_activation"])
    assert all(0 < f <= 1 for f in table["frequency"])
    assert out.unstructured["judge_parse_failures"] == 0
    assert out.unstructured["judge"]["name"] == "offline"
    assert out.flat_metrics()["autointerp_score"] == metrics["autointerp_score"]


def test_parse_failures_are_counted_not_fatal(
    tiny_lm: LoadedLM, random_sae: SparseAutoencoder
) -> None:
    judge = _ScriptedChat("This neuron activates on commas.", "I am not sure")
    out = compute(random_sae, tiny_lm, LAYER, AutointerpConfig(**SMALL), judge)
    assert out.metrics["autointerp"]["n_latents_scored"] == 0
    assert math.isnan(out.metrics["autointerp"]["autointerp_score"])
    assert out.unstructured["judge_parse_failures"] == 4
    assert out.unstructured["judge_failure_examples"][-1]["answer"] == "I am not sure"
    assert out.tables["autointerp_explanations"]["explanation"] == ["commas"] * 4


def test_fixed_latents_and_determinism(tiny_lm: LoadedLM, random_sae: SparseAutoencoder) -> None:
    judge = _ScriptedChat("This neuron activates on commas.", "1, 2")
    config = AutointerpConfig(**{**SMALL, "latents": [5, 3, 7]})
    first = compute(random_sae, tiny_lm, LAYER, config, judge)
    second = compute(random_sae, tiny_lm, LAYER, config, judge)
    assert first.tables == second.tables
    assert first.tables["autointerp_explanations"]["latent"] == [5, 3, 7]
    assert first.metrics["autointerp"]["n_latents_scored"] == 3
    with pytest.raises(ValueError, match="latents must be < d_sae=128"):
        compute(random_sae, tiny_lm, LAYER, AutointerpConfig(latents=[500]), judge)


class _LexicalOracle(Judge):
    """Knows the latent is one token: explains it by that token, detects it by substring."""

    name = "oracle"

    def explain(self, examples: list[str]) -> str:
        return examples[0].split("<<")[1].split(">>")[0]

    def detect_or_none(self, explanation: str, windows: list[str]) -> list[bool] | None:
        return [explanation in w for w in windows]

    def rate(self, kind: str, text: str, reference: str) -> int | None:
        return None


def test_planted_single_token_latent(tiny_lm: LoadedLM) -> None:
    """A latent that fires exactly on one token: the protocol's windows and labels are right,
    a judge that knows the token scores 1, and the offline judge scores well above chance."""
    tokenizer = tiny_lm.tokenizer
    spec = resolve_corpus("stdlib")
    ids_WT = torch.stack(list(token_windows(iter_texts(spec), tokenizer, 64, 64 * 400)))
    target = tokenizer.convert_tokens_to_ids("Ġfile")
    acts_WT = (ids_WT == target).float() * torch.linspace(1.0, 2.0, ids_WT.shape[1])
    config = AutointerpConfig(context_size=64)
    valid_WT = torch.ones_like(ids_WT, dtype=torch.bool)
    valid_WT[:, 0] = False
    valid_WT[:, : config.buffer] = False
    valid_WT[:, -config.buffer :] = False
    text = _TokenText(tokenizer)
    examples = _build_examples(
        7,
        acts_WT,
        ids_WT,
        valid_WT,
        torch.nonzero(valid_WT).tolist(),
        config,
        np.random.default_rng(0),
        text,
    )
    assert examples is not None
    assert len(examples.generation) == 15 and len(examples.scoring) == 14
    assert all("<< file>>" in w for w in examples.generation)
    assert all("<<" not in w for w in examples.scoring)
    # A window is active iff it holds the token (the substring may also be " files").
    assert all(" file" in w for w, y in zip(examples.scoring, examples.labels, strict=True) if y)
    assert sum(examples.labels) >= 4  # the 2 top and 2 importance-weighted windows
    agree = [(" file" in w) == y for w, y in zip(examples.scoring, examples.labels, strict=True)]
    explanation, predictions = _score_latent(_LexicalOracle(), examples)
    assert explanation == " file"
    oracle = detection_scores(predictions, examples.labels)
    assert oracle["accuracy"] == sum(agree) / 14
    assert sum(agree) >= 12
    offline = build_judge("offline")
    offline.observe_corpus([text.window(row[:21].tolist(), None, 0.0) for row in ids_WT[::4]])
    explanation, predictions = _score_latent(offline, examples)
    assert '" file"' in explanation  # quoted as written, leading space included
    scores = detection_scores(predictions, examples.labels)
    assert scores["accuracy"] >= 0.7, (explanation, scores)
    # Above the floor: a constant answer scores 0.5 balanced; this judge finds the token.
    assert scores["balanced_accuracy"] > 0.7, (explanation, scores)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="window_tokens=20 must be a positive odd integer"):
        AutointerpConfig(window_tokens=20)
    with pytest.raises(ValueError, match="context_size=16 must exceed window_tokens=21"):
        AutointerpConfig(context_size=16)
    with pytest.raises(ValueError, match="n_latents=0 must be an integer >= 1"):
        AutointerpConfig(n_latents=0)
    with pytest.raises(ValueError, match=r"act_threshold_frac=1\.5 must lie in \[0, 1\)"):
        AutointerpConfig(act_threshold_frac=1.5)


def test_bad_layer_or_width(tiny_lm: LoadedLM, random_sae: SparseAutoencoder) -> None:
    judge = _ScriptedChat("x", "None")
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        compute(random_sae, tiny_lm, 9, AutointerpConfig(**SMALL), judge)
    wide = build_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4))
    with pytest.raises(ValueError, match="SAE d_in=32 does not match"):
        compute(wide, tiny_lm, LAYER, AutointerpConfig(**SMALL), judge)


def test_detection_scores_and_the_constant_answer_floor() -> None:
    labels = [True, True, False, False, False, False, False, False, False, False]
    never = detection_scores([False] * 10, labels)
    assert never == {
        "accuracy": 0.8,
        "balanced_accuracy": 0.5,
        "never_fires": 0.8,
        "always_fires": 0.2,
    }
    assert detection_scores([True] * 10, labels)["balanced_accuracy"] == 0.5
    # One hit of two, no false alarm: accuracy 0.9 but balanced (0.5 + 1) / 2.
    one_hit = detection_scores([True] + [False] * 9, labels)
    assert one_hit["accuracy"] == 0.9 and one_hit["balanced_accuracy"] == 0.75
    # A latent that fires in every window: only the present class counts.
    assert detection_scores([True, False], [True, True])["balanced_accuracy"] == 0.5
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        detection_scores([True] * 3, [True, False])


def test_a_never_fires_judge_scores_exactly_the_floor(
    tiny_lm: LoadedLM, random_sae: SparseAutoencoder
) -> None:
    """SAEBench's accuracy of a judge that always answers "none fires" is the floor itself, and
    its balanced accuracy 0.5: the floor is what the headline number must be read against."""
    judge = _ScriptedChat("This neuron activates on commas.", "None")
    out = compute(random_sae, tiny_lm, LAYER, AutointerpConfig(**SMALL), judge)
    metrics = out.metrics["autointerp"]
    assert metrics["n_latents_scored"] == 4
    assert metrics["autointerp_score"] == pytest.approx(metrics["autointerp_never_fires_score"])
    assert metrics["constant_answer_score"] >= metrics["autointerp_score"]
    assert metrics["autointerp_balanced_accuracy"] == 0.5
    table = out.tables["autointerp_explanations"]
    assert table["score"] == table["never_fires_score"]


class _RecordingJudge(_LexicalOracle):
    """The lexical oracle, remembering the windows each explanation was asked from."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[str]] = []

    def explain(self, examples: list[str]) -> str:
        self.seen.append(list(examples))
        return super().explain(examples)


def test_explain_latents_on_demand(tiny_lm: LoadedLM) -> None:
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=tiny_lm.d_model, d_sae=128, k=8))
    with torch.no_grad():
        sae.b_enc[9] = -1e6  # latent 9 never fires
    config = AutointerpConfig(**SMALL)
    judge = _RecordingJudge()
    explanations = explain_latents(sae, tiny_lm, LAYER, [5, 3, 9, 3], judge, config)
    assert list(explanations) == [5, 3]  # asked order, duplicates once, the silent latent out
    assert all(isinstance(e, str) and e for e in explanations.values())
    for windows in judge.seen:
        assert 1 <= len(windows) <= config.n_top_ex_for_generation + config.n_iw_ex_for_generation
        assert all("<<" in w for w in windows[: min(3, len(windows))])  # top windows marked
    # A latent's explanation does not depend on the others asked for.
    alone = explain_latents(sae, tiny_lm, LAYER, [3], _RecordingJudge(), config)
    assert alone == {3: explanations[3]}
    # Latents below autointerp's min_firings (never in its sample) are explained too.
    rare = AutointerpConfig(**{**SMALL, "min_firings": 10_000})
    assert set(explain_latents(sae, tiny_lm, LAYER, [5], _RecordingJudge(), rare)) == {5}
    with pytest.raises(ValueError, match=r"latent ids \[128\] are outside \[0, d_sae=128\)"):
        explain_latents(sae, tiny_lm, LAYER, [1, 128], judge, config)
    assert explain_latents(sae, tiny_lm, LAYER, [], judge, config) == {}


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_kept_scan_encoding_gives_the_same_windows(tiny_lm: LoadedLM, architecture: str) -> None:
    """With ``sae_key`` (issue 19), the SAE's sparse encoding of the scan is kept across calls:
    its columns equal the dense path's exactly, and every latent sees the same windows."""
    import evaluation.interpretability.autointerp as autointerp

    torch.manual_seed(1)
    sae = build_sae(SAEConfig(architecture=architecture, d_in=tiny_lm.d_model, d_sae=128, k=8))
    config = AutointerpConfig(**SMALL)
    prepared = autointerp._prepare(
        tiny_lm, LAYER, config, _RecordingJudge(), np.random.default_rng(0)
    )
    latents = [7, 0, 127, 64, 7]
    dense = prepared.columns(sae, latents)
    autointerp._ENCODED_SCANS.clear()
    kept = prepared.columns(sae, latents, sae_key=f"test-{architecture}")
    assert torch.equal(kept, dense) and bool((dense > 0).any())
    assert len(autointerp._ENCODED_SCANS) == 1
    plain, cached = _RecordingJudge(), _RecordingJudge()
    first = explain_latents(sae, tiny_lm, LAYER, [3, 5, 11], plain, config)
    again = explain_latents(sae, tiny_lm, LAYER, [3, 5, 11], cached, config, f"test-{architecture}")
    assert again == first and cached.seen == plain.seen
    assert len(autointerp._ENCODED_SCANS) == 1  # the version's encoding, reused


def test_scan_reads_only_the_eval_region(tiny_lm: LoadedLM) -> None:
    """No SAE was trained on the text autointerp explains: the scan is the corpus's eval region
    (which no harvest reads), and the config records the rule."""
    config = AutointerpConfig(**SMALL)
    spec = resolve_corpus("stdlib")
    assert config.corpus_region == region_description(spec)
    assert "eval region" in config.corpus_region
    ids_WT, _, acts_WTD = _scan(tiny_lm, LAYER, config)
    eval_WT = torch.stack(
        list(token_windows(iter_texts(spec, region="eval"), tiny_lm.tokenizer, 64, 3072))
    )
    torch.testing.assert_close(ids_WT, eval_WT)
    harvest = {
        tuple(w.tolist())
        for w in token_windows(iter_texts(spec, region="harvest"), tiny_lm.tokenizer, 64, 3072)
    }
    assert not any(tuple(w.tolist()) in harvest for w in ids_WT)
    assert acts_WTD.shape[:2] == ids_WT.shape
