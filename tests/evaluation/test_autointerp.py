from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluation.autointerp import (
    AutointerpConfig,
    _build_examples,
    _score_latent,
    _TokenText,
    compute,
)
from evaluation.schema import EvalOutput
from project.corpus import iter_texts, resolve_corpus, token_windows
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
    assert set(metrics) == {"autointerp_score", "autointerp_std_dev", "n_latents_scored"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["autointerp_score"] <= 1.0
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
    assert _score_latent(_LexicalOracle(), examples) == (" file", sum(agree) / 14)
    assert sum(agree) >= 12
    offline = build_judge("offline")
    offline.observe_corpus([text.window(row[:21].tolist(), None, 0.0) for row in ids_WT[::4]])
    explanation, score = _score_latent(offline, examples)
    assert '" file"' in explanation  # quoted as written, leading space included
    assert score >= 0.7, (explanation, score)


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
