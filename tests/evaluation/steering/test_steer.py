"""Steering (evaluation/steering/): the protocol's arithmetic, its inputs, both modes end to end
on a tiny random LM with a registered TopK SAE, runs linked to the version and reused."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import register_as_trained
from mlflow.tracking import MlflowClient

import evaluation.steering.steer as steer_module
from evaluation.selection.config import LatentStatsConfig
from evaluation.steering import latent_targets
from evaluation.steering.config import SteerConfig, parse_factors
from evaluation.steering.interventions import ClampLatent
from evaluation.steering.latent_targets import echoes_concept
from evaluation.steering.protocol import (
    Row,
    Target,
    _vector,
    auroc_per_column,
    best_factor,
    harmonic_mean,
    latent_floor_rows,
    rate_rows,
    rating_value,
    summarize,
)
from evaluation.steering.steer import STEER_RUN_TYPE, pooled_lift, steer
from project.concepts import (
    Instruction,
    InstructionSplit,
    load_concepts,
    load_instructions,
    read_concepts_file,
    sample_instructions,
)
from project.judges import ChatJudge, build_judge, parse_rating
from project.saes import SAEConfig, build_sae
from project.tracking import RUN_TYPE_TAG

NAME = "sae-tiny-steer"
LAYER = 1


def register_tiny_sae(tiny_lm_dir: str) -> str:
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=128, k=8))
    version = register_as_trained(
        sae, registered_model=NAME, lm_name=tiny_lm_dir, layer=LAYER, target_l0=8
    )
    return f"models:/{NAME}/{version.version}"


CONCEPTS = [
    {
        "concept": "cooking and recipes",
        "genre": "text",
        "positives": [
            "Whisk the eggs with sugar, fold in the flour and bake the cake for forty minutes.",
            "Chop the onions, fry them in butter and add the tomatoes to the simmering sauce.",
            "Knead the dough, let it rise overnight and bake the bread in a hot oven.",
        ],
        "negatives": [],
    },
    {
        "concept": "the ocean and marine life",
        "genre": "text",
        "positives": [
            "Dolphins and whales swam past the coral reef as waves rolled over the deep sea.",
            "The tide pulled the fishing boats out past the lighthouse into the open ocean.",
            "Sharks, turtles and bright fish live among the kelp forests of the cold sea.",
        ],
        "negatives": [],
    },
]


@pytest.fixture
def concepts_file(tmp_path: Path) -> str:
    path = tmp_path / "concepts.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in CONCEPTS) + "\n")
    return str(path)


def small_config(**changes: object) -> SteerConfig:
    values: dict = {
        "n_concepts": 2,
        "factors": (0.0, 1.0, 8.0),
        "n_instructions": 2,
        "max_new_tokens": 4,
        "n_examples": 3,
        "example_tokens": 16,
        "stats": LatentStatsConfig(n_tokens=512, context_size=32),
    }
    values.update(changes)
    return SteerConfig(**values)


def runs_of(run_type: str) -> list:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`{RUN_TYPE_TAG}` = '{run_type}'")


def load_table(run_id: str, name: str) -> list[dict]:
    return mlflow.load_table(f"tables/{name}.json", run_ids=[run_id]).to_dict("records")


# ---------------------------------------------------------------------------------------------
# arithmetic and inputs


def test_harmonic_mean_with_zeros() -> None:
    assert harmonic_mean(2, 2, 2) == pytest.approx(2.0)
    assert harmonic_mean(1, 2, 2) == pytest.approx(3 / (1 + 0.5 + 0.5))
    for parts in [(0, 2, 2), (2, 0, 2), (2, 2, 0), (0, 0, 0)]:
        assert harmonic_mean(*parts) == 0.0


def test_best_factor_is_the_dev_argmax_ties_to_the_smaller() -> None:
    assert best_factor({0.5: 0.2, 1.0: 0.7, 2.0: 0.4}) == 1.0
    assert best_factor({4.0: 0.5, 1.0: 0.5, 2.0: 0.1}) == 1.0


def test_methods_are_compared_with_the_random_floor_paired_by_target() -> None:
    """summarize() logs (method - random) per target at each one's alpha*, with an interval, and
    the per-factor table carries intervals over targets."""
    instruction = Instruction("Say something.", "text")
    targets = [Target(f"c{t}", f"c{t}", None, latent=t, max_activation=1.0) for t in range(4)]
    rows, ratings = [], []
    # Per target t: the SAE rates concept 2 at factor 2 on both halves; random rates t/4 there.
    for t in range(4):
        for split in ("dev", "test"):
            for method, concept in (("sae", 2.0), ("random", t / 4)):
                for factor in (1.0, 2.0):
                    rows.append(Row(method, t, instruction, split, factor, instruction.text))
                    c = concept if factor == 2.0 else 0.0
                    ratings.append(
                        {
                            "concept": c,
                            "instruct": 2.0,
                            "fluency": 2.0,
                            "score": harmonic_mean(c, 2, 2),
                        }
                    )
    result = summarize(rows, ratings, targets, seed=0)
    m = result.metrics
    expected = sum(2.0 - t / 4 for t in range(4)) / 4
    assert m["sae_minus_random_concept"] == pytest.approx(expected)
    assert m["sae_minus_random_concept_ci_low"] <= expected <= m["sae_minus_random_concept_ci_high"]
    assert m["sae_minus_random_concept_ci_low"] > 0  # a consistent lead on every target
    scores = [2.0 - harmonic_mean(t / 4, 2, 2) for t in range(4)]
    assert m["sae_minus_random_steering"] == pytest.approx(sum(scores) / 4)
    assert "random_minus_random_concept" not in m
    table = result.tables["per_factor"]
    at = {
        (mth, f): i for i, (mth, f) in enumerate(zip(table["method"], table["factor"], strict=True))
    }
    i = at[("random", 2.0)]
    assert table["concept"][i] == pytest.approx(sum(t / 4 for t in range(4)) / 4)
    assert table["concept_ci_low"][i] <= table["concept"][i] <= table["concept_ci_high"][i]
    assert table["fluency_ci_low"][i] == table["fluency_ci_high"][i] == 2.0
    # At one factor: the SAE's concept lead over random, paired by target. Its vector's norm is
    # α·m_i, not the random direction's α·s, so the lead is not called an equal-norm one.
    j = at[("sae", 2.0)]
    assert math.isnan(table["concept_minus_random"][j])
    assert table["concept_minus_random_unequal_norm"][j] == pytest.approx(expected)
    assert table["concept_minus_random_unequal_norm_ci_low"][j] > 0
    assert table["concept_minus_random_unequal_norm"][at[("sae", 1.0)]] == 0.0
    assert math.isnan(table["concept_minus_random"][i])  # random against itself: not defined
    # The rise over the smallest factor: the SAE goes from 0 (alpha 1) to 2 (alpha 2) everywhere.
    assert table["concept_rise"][j] == pytest.approx(2.0)
    assert table["concept_rise_ci_low"][j] == table["concept_rise_ci_high"][j] == 2.0
    assert table["concept_rise"][i] == pytest.approx(sum(t / 4 for t in range(4)) / 4)
    assert math.isnan(table["concept_rise"][at[("sae", 1.0)]])


def test_concept_lift_credits_only_what_steering_added() -> None:
    """A target whose concept the unsteered answer already carries gets the paper's score but
    no lift; a target whose concept appears only when steered gets both."""
    instruction = Instruction("Say something.", "text")
    targets = [Target(f"c{t}", f"c{t}", None, latent=t, max_activation=1.0) for t in range(2)]
    rows, ratings = [], []
    # Target 0: concept 2 unsteered and steered (free). Target 1: 0 unsteered, 2 at factor 2.
    for t, unsteered in ((0, 2.0), (1, 0.0)):
        for split in ("dev", "test"):
            rows.append(Row("unsteered", t, instruction, split, 0.0, instruction.text))
            ratings.append({"concept": unsteered, "instruct": 2.0, "fluency": 2.0})
            for factor in (1.0, 2.0):
                rows.append(Row("sae", t, instruction, split, factor, instruction.text))
                c = 2.0 if (t == 0 or factor == 2.0) else 0.0
                ratings.append({"concept": c, "instruct": 2.0, "fluency": 2.0})
    for r in ratings:
        r["score"] = harmonic_mean(r["concept"], r["instruct"], r["fluency"])
    result = summarize(rows, ratings, targets, seed=0)
    m = result.metrics
    assert m["steering_score"] == pytest.approx(2.0)  # both targets look perfectly steered
    assert m["steering_score_lift"] == pytest.approx(1.0)  # only target 1 was
    assert m["concept_lift_score"] == pytest.approx(1.0)
    assert m["free_concept_share"] == pytest.approx(0.5)
    assert m["unsteered_steering_score_lift"] == 0.0  # the unsteered answer lifts nothing
    table = result.tables["per_concept"]
    sae = [i for i, mth in enumerate(table["method"]) if mth == "sae"]
    assert [table["unsteered_concept"][i] for i in sae] == [2.0, 0.0]
    assert [table["test_score_lift"][i] for i in sae] == [0.0, 2.0]
    assert [table["alpha_star_lift"][i] for i in sae] == [1.0, 2.0]
    steered = [r for row, r in zip(rows, ratings, strict=True) if row.method == "sae"]
    assert all(
        r["concept_lift"] == max(0.0, r["concept"] - r["unsteered_concept"]) for r in steered
    )


def test_seeded_disjoint_dev_test_split() -> None:
    pool = load_instructions("builtin")
    assert len(pool) >= 100 and {i.genre for i in pool} == {"text", "code", "math"}
    a = sample_instructions("regular expressions", pool, 10, "code", seed=0)
    assert len(a.dev) == 5 and len(a.test) == 5
    assert not set(a.dev) & set(a.test)
    assert all(i.genre == "code" for i in (*a.dev, *a.test))
    assert sample_instructions("regular expressions", pool, 10, "code", seed=0) == a
    assert sample_instructions("regular expressions", pool, 10, "code", seed=1) != a
    assert sample_instructions("dates and times", pool, 10, "code", seed=0) != a
    odd = sample_instructions("x", pool, 5, None, seed=0)
    assert (len(odd.dev), len(odd.test)) == (2, 3)


def test_auroc_per_column() -> None:
    scores = torch.tensor([[3.0, 0.0, 1.0], [2.0, 0.0, 1.0], [1.0, 5.0, 1.0], [0.0, 4.0, 1.0]])
    labels = torch.tensor([1, 1, 0, 0])
    assert auroc_per_column(scores, labels).tolist() == pytest.approx([1.0, 0.0, 0.5])


def test_shipped_concepts_are_offline_text() -> None:
    from importlib import resources

    from project.corpus import stdlib_dir

    shipped = json.loads(resources.files("project.concepts").joinpath("concepts.json").read_text())[
        "concepts"
    ]
    assert len(shipped) >= 20 and {c["genre"] for c in shipped} == {"text", "code", "math"}
    for item in shipped:  # every concept names library files that exist here
        assert any((stdlib_dir() / path).exists() for path in item["stdlib"]), item
    concepts = load_concepts("stdlib", 3, n_examples=4, seed=0)
    assert len(concepts) == 3
    for c in concepts:
        assert len(c.positives) == 4 and len(c.negatives) == 4
        assert not set(c.positives) & set(c.negatives)
    assert load_concepts("stdlib", 3, n_examples=4, seed=0) == concepts


class _ScriptedChat(ChatJudge):
    """A chat judge whose model answers from a script: the parse path is the real one."""

    name = "scripted"

    def __init__(self, answers: dict[str, str]) -> None:
        super().__init__()
        self.answers = answers

    def _chat(self, messages: list[dict[str, str]], max_tokens: int) -> str | None:
        content = messages[-1]["content"]
        for needle, answer in self.answers.items():
            if needle in content:
                return answer
        return "no rating here"


def test_judge_parsing_edge_cases() -> None:
    assert parse_rating("The text is fluent.\nRating: [[2]]") == 2
    assert parse_rating("Rating: [[0]] ... on reflection Rating: [[1]]") == 1  # the last one
    assert parse_rating("rating: [[ 2 ]]") == 2
    assert parse_rating("I would say 2.") is None
    # AxBench's rule: after the last "Rating:", first line, brackets/quotes/* stripped, a float.
    assert parse_rating("Rating: 2") == 2 and parse_rating("Rating: [[1.5]]") == 1.5
    assert parse_rating('Rating: **"1"**\nmore text') == 1
    assert parse_rating("Rating: [[two]]") is None
    assert parse_rating("") is None
    assert parse_rating("Rating: [[3]]") is None  # outside the scale
    assert parse_rating("Rating: [[-1]]") is None
    assert rating_value(None) is None and rating_value(3) is None and rating_value(1) == 1.0
    # Unparsable ratings count 0 (so the score is 0) and are counted once per question.
    judge = _ScriptedChat(
        {"[Concept Start]": "Present.\nRating: [[2]]", "[Instruction Start]": "Rating: [[1]]"}
    )
    target = Target("c", "c", None, latent=0, max_activation=1.0)
    rows = [Row("sae", 0, Instruction("do x"), "dev", 1.0, "do x")] * 2
    ratings, unparsable = rate_rows(rows, ["some text", "some text"], [target], judge)
    assert unparsable == 1  # fluency, asked once for the two identical rows
    assert ratings[0] == {"concept": 2.0, "instruct": 1.0, "fluency": 0.0, "score": 0.0}
    assert judge.parse_failures == 1


def test_clamp_sets_the_latent_and_keeps_the_error() -> None:
    torch.manual_seed(1)
    sae = build_sae(SAEConfig(architecture="topk", d_in=16, d_sae=32, k=4))
    hidden = torch.randn(2, 3, 16)
    clamp = ClampLatent(sae, torch.tensor([5, -1]), torch.tensor([50.0, 0.0]))
    out = clamp(hidden, torch.tensor([0, 1]))
    assert torch.equal(out[1], hidden[1])  # latent -1: untouched
    before = sae.encode(hidden[0])[:, 5]
    expected = hidden[0] + (50.0 - before)[:, None] * sae.W_dec[5].detach()
    assert torch.allclose(out[0], expected, atol=1e-5)
    # That is decode(f with f_5 := 50) plus the SAE error x - decode(f(x)).
    f = sae.encode(hidden[0])
    f_clamped = f.clone()
    f_clamped[:, 5] = 50.0
    error = hidden[0] - sae.decode(f)
    assert torch.allclose(out[0], sae.decode(f_clamped) + error, atol=1e-4)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mode": "both"}, "unknown mode 'both'; valid modes: latent, concept"),
        ({"selection": "dtcc"}, "unknown selection 'dtcc'; valid selections: none, "),
        ({"intervention": "swap"}, "unknown intervention"),
        ({"factors": ()}, "factors is empty"),
        ({"factors": (1.0, float("nan"))}, "not a finite number"),
        ({"n_instructions": 0}, "n_instructions=0"),
        ({"lm_dtype": "float16"}, "lm_dtype='float16' is not supported; valid: \\['float32', "),
        ({"device": "tpu"}, "device='tpu' is not supported; valid: \\['cpu', 'cuda', 'auto'\\]"),
        ({"compile": "yes"}, "compile='yes' must be true or false"),
        ({"compile": True, "trained": ("lora",)}, "compile=true with trained=\\['lora'\\]"),
    ],
)
def test_bad_config(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        small_config(**changes)


def test_factor_list_with_a_non_number() -> None:
    assert parse_factors("0.5, 1,2") == (0.5, 1.0, 2.0)
    assert len(parse_factors("axbench")) == 14
    with pytest.raises(ValueError, match="factors: 'two' in '1,two' is not a number"):
        parse_factors("1,two")


def test_bad_concept_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        read_concepts_file(empty)
    good = json.dumps({"concept": "cats", "positives": ["a cat"], "negatives": []})
    for line, message in [
        ("{not json", "line 2 is not valid JSON"),
        (
            json.dumps({"concept": "dogs", "positives": ["a dog"]}),
            r"line 2 lacks the key\(s\) \['negatives'\]",
        ),
        (
            json.dumps({"concept": "dogs", "positives": [], "negatives": []}),
            "line 2: 'positives' is empty",
        ),
        (json.dumps({"concept": "", "positives": ["x"], "negatives": []}), "line 2: 'concept'"),
        (
            json.dumps({"concept": "d", "positives": ["x"], "negatives": [], "genre": "art"}),
            "genre 'art'",
        ),
        ("[1, 2]", "line 2 is not a JSON object"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(good + "\n" + line + "\n")
        with pytest.raises(ValueError, match=message):
            read_concepts_file(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_concepts_file(tmp_path / "missing.jsonl")


def test_zero_instructions(tmp_path: Path) -> None:
    for name, text in [("i.txt", "\n \n"), ("i.json", "[]"), ("i.jsonl", "")]:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match="zero instructions"):
            load_instructions(str(path))
    with pytest.raises(ValueError, match="entry 2 has no non-empty 'instruction'"):
        (tmp_path / "x.json").write_text(json.dumps(["ok", {"genre": "text"}]))
        load_instructions(str(tmp_path / "x.json"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"judge": "gpt"}, "unknown judge 'gpt'"),
        ({"config_changes": {"concepts": "EMPTY"}}, "is empty"),
        ({"config_changes": {"instructions": "ZERO"}}, "zero instructions"),
        ({"uri": "models:/no-such-model/1"}, "does not resolve"),
    ],
)
def test_bad_input_fails_before_any_run(
    tiny_lm_dir: str, tracking_uri: str, tmp_path: Path, kwargs: dict, message: str
) -> None:
    uri = register_tiny_sae(tiny_lm_dir)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "zero.txt").write_text("")
    changes = {
        k: {"EMPTY": str(tmp_path / "empty.jsonl"), "ZERO": str(tmp_path / "zero.txt")}[v]
        for k, v in kwargs.get("config_changes", {}).items()
    }
    with pytest.raises(ValueError, match=message):
        steer(kwargs.get("uri", uri), small_config(**changes), kwargs.get("judge", "offline"))
    assert runs_of(STEER_RUN_TYPE) == [] and runs_of("latent_stats") == []


# ---------------------------------------------------------------------------------------------
# both modes end to end on the tiny model


def test_concept_mode_steers_supervised_selections_on_tiny_model(
    tiny_lm_dir: str, tracking_uri: str, concepts_file: str
) -> None:
    """supervised_k=(1, 2): two more methods per concept, each steering its select-and-label
    latents (logged with their labels, F1 and support), compared with the floor like the rest."""
    uri = register_tiny_sae(tiny_lm_dir)
    config = small_config(concepts=concepts_file, supervised_k=(1, 2), supervised_min_support=3)
    (result,) = steer(uri, config, "offline")
    metrics = MlflowClient().get_run(result.run_id).data.metrics
    table = load_table(result.run_id, "supervised_latents")
    concepts = {c["concept"] for c in CONCEPTS}
    assert {(t["concept"], t["method"]) for t in table} == {
        (c, m) for c in concepts for m in ("sae_sup_k1", "sae_sup_k2")
    }
    assert all(t["label"] == t["concept"] and 0.0 <= t["f1_c"] <= 1.0 for t in table)
    for concept in concepts:
        k2 = [t for t in table if t["concept"] == concept and t["method"] == "sae_sup_k2"]
        k1 = [t for t in table if t["concept"] == concept and t["method"] == "sae_sup_k1"]
        assert [t["rank"] for t in k2] == [1, 2] and k1[0]["latent"] == k2[0]["latent"]
    assert metrics["supervised_support_fallbacks"] >= 0
    generations = load_table(result.run_id, "generations")
    per_row = 1 + 1 + 5 * len(config.factors)  # unsteered, prompt, five methods x factors
    assert len(generations) == config.n_concepts * config.n_instructions * per_row
    for method in ("sae_sup_k1", "sae_sup_k2"):
        assert 0.0 <= metrics[f"{method}_steering_score"] <= 2.0
        assert f"{method}_minus_random_concept" in metrics
    # K = 1 steers the same vector as the top latent alone, so at α = 0 it is the unsteered text.
    unsteered = {
        (g["concept"], g["instruction"]): g["text"]
        for g in generations
        if g["method"] == "unsteered"
    }
    zero = [g for g in generations if g["method"].startswith("sae_sup") and g["factor"] == 0.0]
    assert zero and all(g["text"] == unsteered[(g["concept"], g["instruction"])] for g in zero)


def test_concept_mode_on_tiny_model(
    tiny_lm_dir: str, tracking_uri: str, concepts_file: str
) -> None:
    uri = register_tiny_sae(tiny_lm_dir)
    config = small_config(concepts=concepts_file)
    (result,) = steer(uri, config, "offline")
    run = MlflowClient().get_run(result.run_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert tags[RUN_TYPE_TAG] == STEER_RUN_TYPE and tags["steer_mode"] == "concept"
    # The tiny LM's offline judge was never measured against careful reading: it says so.
    assert tags["judge_agreement"] == "not measured"
    assert tags["model_uri"] == uri and tags["lm_name"] == tiny_lm_dir
    for prefix in ("", "diffmean_", "random_", "prompt_", "unsteered_"):
        for name in ("steering", "concept", "instruct", "fluency"):
            assert 0.0 <= metrics[f"{prefix}{name}_score"] <= 2.0
    version = MlflowClient().get_model_version(NAME, "1")
    assert version.tags["steer.concept.run_id"] == result.run_id
    (stats_run,) = runs_of("latent_stats")
    assert version.tags["latent_stats.run_id"] == stats_run.info.run_id

    generations = load_table(result.run_id, "generations")
    per_row = 1 + 1 + 3 * len(config.factors)  # unsteered, prompt, three methods x factors
    assert len(generations) == config.n_concepts * config.n_instructions * per_row
    # alpha = 0 reproduces the unsteered model: same text, same ratings, for every method.
    unsteered = {
        (g["concept"], g["instruction"]): g for g in generations if g["method"] == "unsteered"
    }
    zero = [g for g in generations if g["factor"] == 0.0 and g["method"] in ("sae", "diffmean")]
    assert zero
    for g in zero:
        u = unsteered[(g["concept"], g["instruction"])]
        assert (g["text"], g["score"], g["fluency_rating"]) == (
            u["text"],
            u["score"],
            u["fluency_rating"],
        )
    # Steering at the largest factor changes the text.
    strong = [g for g in generations if g["factor"] == 8.0 and g["method"] == "sae"]
    assert any(g["text"] != unsteered[(g["concept"], g["instruction"])]["text"] for g in strong)
    per_concept = load_table(result.run_id, "per_concept")
    assert {p["alpha_star"] for p in per_concept if p["method"] != "prompt"} <= set(config.factors)
    assert {p["method"] for p in load_table(result.run_id, "per_factor")} == {
        "unsteered",
        "prompt",
        "sae",
        "diffmean",
        "random",
    }

    # The same config is reused; force recomputes (and reuses the latent table).
    (again,) = steer(uri, config, "offline")
    assert again.reused and again.run_id == result.run_id
    (forced,) = steer(uri, config, "offline", force=True)
    assert not forced.reused and forced.run_id != result.run_id
    assert len(runs_of(STEER_RUN_TYPE)) == 2


def test_bfloat16_lm_steers_as_float32_within_rounding(
    tiny_lm_dir: str, tracking_uri: str, concepts_file: str
) -> None:
    """Issue 19's GPU path, checked on the CPU: the LM loaded in bfloat16 runs the whole
    protocol (the SAE's AUROC and clamp in float32 beside it, a LoRA trained on it), and with
    the same seeds most of its texts are float32's (measured 32 of 56: rounding flips some
    sampled tokens of the tiny random LM's near-uniform distributions)."""
    uri = register_tiny_sae(tiny_lm_dir)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        config = small_config(
            concepts=concepts_file, lm_dtype=dtype, intervention="clamp", trained=("lora",),
            trained_pairs=4, trained_min_pairs=4, trained_epochs=1, random_floor=False,
        )  # fmt: skip
        (result,) = steer(uri, config, "offline")
        assert not result.reused
        runs[dtype] = MlflowClient().get_run(result.run_id)
    half = runs["bfloat16"]
    assert half.data.params["lm_dtype"] == "bfloat16"
    for name in ("unsteered_fluency_score", "steering_score", "lora_steering_score"):
        assert 0.0 <= half.data.metrics[name] <= 2.0
    # Same prompts, same seeds: greedy-equivalent rows agree in most texts despite rounding.
    texts = {
        dtype: {
            (g["method"], g["concept"], g["instruction"], g["factor"]): g["text"]
            for g in load_table(run.info.run_id, "generations")
        }
        for dtype, run in runs.items()
    }
    assert texts["float32"].keys() == texts["bfloat16"].keys()
    same = sum(texts["float32"][k] == texts["bfloat16"][k] for k in texts["float32"])
    assert same >= len(texts["float32"]) // 3


def test_latent_mode_on_tiny_model(tiny_lm_dir: str, tracking_uri: str) -> None:
    uri = register_tiny_sae(tiny_lm_dir)
    config = small_config(mode="latent", intervention="clamp", factors=(1.0, 4.0))
    (result,) = steer(uri, config, "offline")
    metrics = MlflowClient().get_run(result.run_id).data.metrics
    assert 0.0 <= metrics["steering_score"] <= 2.0 and "diffmean_steering_score" not in metrics
    per_concept = load_table(result.run_id, "per_concept")
    sae_rows = [p for p in per_concept if p["method"] == "sae"]
    assert len(sae_rows) == 2
    assert all(p["concept"] and p["latent"] >= 0 for p in sae_rows)
    generations_all = load_table(result.run_id, "generations")
    generations = [g for g in generations_all if g["method"] != "random"]
    assert len(generations) == 2 * 2 * (1 + 2)
    # The run logs the lift beside the paper's score, and the explained pool it sampled from.
    assert 0.0 <= metrics["steering_score_lift"] <= 2.0
    assert 0.0 <= metrics["free_concept_share"] <= 1.0
    assert metrics["explain_pool_size"] >= 2 and metrics["explain_asked"] >= 2
    assert all(json.loads(p["explanation_token_rates"]) is not None for p in sae_rows)
    # No target is steered on an instruction that already holds its concept's evidence.
    assert metrics["echo_dropped_targets"] == 0 and metrics["echo_excluded_instructions"] >= 0
    judge = build_judge("offline")
    for g in generations_all:
        assert not echoes_concept(judge.informative_tokens(g["concept"]), g["instruction"]), g
    pooled = pooled_lift([result.run_id, result.run_id])
    assert pooled["pooled_n_targets"] == 4
    mean = sum(p["test_score_lift"] for p in sae_rows) / 2
    assert pooled["pooled_steering_score_lift"] == pytest.approx(mean)
    # The floor: a random direction per target at the SAE's own α* (by score and by lift), on
    # the test instructions only, and the SAE's lead over it paired by target.
    floor_rows = [p for p in per_concept if p["method"] == "random"]
    assert [p["alpha_star"] for p in floor_rows] == [p["alpha_star"] for p in sae_rows]
    assert [p["alpha_star_lift"] for p in floor_rows] == [p["alpha_star_lift"] for p in sae_rows]
    floor_generations = [g for g in generations_all if g["method"] == "random"]
    assert floor_generations and all(g["split"] == "test" for g in floor_generations)
    stars = {p["concept"]: {p["alpha_star"], p["alpha_star_lift"]} for p in sae_rows}
    assert all(g["factor"] in stars[g["concept"]] for g in floor_generations)
    assert len(floor_generations) == sum(len(a) for a in stars.values())  # 1 test instruction
    assert "sae_minus_random_steering_lift_ci_low" in metrics
    lead = sum(
        a["test_score_lift"] - b["test_score_lift"]
        for a, b in zip(sae_rows, floor_rows, strict=True)
    )
    assert pooled["pooled_n_floor_targets"] == 4
    assert pooled["pooled_steering_score_lift_minus_random"] == pytest.approx(lead / 2)
    # The concept rating alone, pooled the same way: did the push write the concept at all?
    concept_lead = sum(
        a["test_concept_lift"] - b["test_concept_lift"]
        for a, b in zip(sae_rows, floor_rows, strict=True)
    )
    assert pooled["pooled_concept_lift"] == pytest.approx(
        sum(p["test_concept_lift"] for p in sae_rows) / 2
    )
    assert pooled["pooled_concept_lift_minus_random"] == pytest.approx(concept_lead / 2)
    low, high = (pooled[f"pooled_concept_lift_minus_random_ci_{e}"] for e in ("low", "high"))
    assert low <= pooled["pooled_concept_lift_minus_random"] <= high
    (without,) = steer(uri, replace(config, random_floor=False), "offline")
    assert not [g for g in load_table(without.run_id, "generations") if g["method"] == "random"]


def test_latent_floor_rows_steer_at_the_sae_alpha_stars_with_the_latent_norm() -> None:
    """latent_floor_rows: per target, the test instructions at the SAE's dev α* by score
    and by lift (here 2 and 1: factor 2 earns a concept the unsteered answer has); the random
    vector's norm is factor · m_i, the latent's own, not the run's reference scale."""
    dev, test = Instruction("Say a.", "text"), Instruction("Say b.", "text")
    target = Target("t", "t", None, latent=3, max_activation=5.0, random_D=torch.ones(4) / 2)
    target.random_scale = 5.0
    target.split = InstructionSplit((dev,), (test,))
    rows, ratings = [], []
    for split, instruction in (("dev", dev), ("test", test)):
        rows.append(Row("unsteered", 0, instruction, split, 0.0, instruction.text))
        ratings.append({"concept": 1.0, "instruct": 2.0, "fluency": 2.0})
        for factor, concept in ((1.0, 1.5), (2.0, 2.0)):
            rows.append(Row("sae", 0, instruction, split, factor, instruction.text))
            ratings.append({"concept": concept, "instruct": 2.0, "fluency": 2.0 - factor / 2})
    for r in ratings:
        r["score"] = harmonic_mean(r["concept"], r["instruct"], r["fluency"])
    floor = latent_floor_rows(rows, ratings, [target])
    assert {(r.method, r.split, r.instruction, r.factor) for r in floor} == {
        ("random", "test", test, 1.0), ("random", "test", test, 2.0)
    }  # fmt: skip
    vector = _vector(floor[0], target, {}, scale=100.0)
    assert vector is not None and float(vector.norm()) == pytest.approx(floor[0].factor * 5.0)


def test_command_line_bad_input_exits_2_before_any_run(tiny_lm_dir: str, tracking_uri: str) -> None:
    import subprocess
    import sys

    uri = register_tiny_sae(tiny_lm_dir)
    # One process (imports take seconds); the other bad inputs are checked in-process above.
    done = subprocess.run(
        [sys.executable, "-m", "evaluation.steering.steer", "--model_uri", uri, "--mode", "both"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "unknown mode 'both'; valid modes: latent, concept" in done.stderr
    assert runs_of(STEER_RUN_TYPE) == []


def test_selection_criteria_are_registered_with_steer() -> None:
    from evaluation.selection.registry import SELECTIONS, check_selection

    assert {"none", "dtc", "dtc_alone", "output_score", "input_score", "supervised"} <= set(
        SELECTIONS
    )
    assert check_selection("dtc") == "dtc"
    with pytest.raises(ValueError, match="dtc"):
        check_selection("dtcc")


# ---------------------------------------------------------------------------------------------
# steering gain of a selection over the same version's selection=none run


def test_steering_gain_rule() -> None:
    from evaluation.steering.steer import steering_gain

    assert steering_gain(0.3, 0.2) == pytest.approx(50.0)
    assert steering_gain(0.1, 0.2) == pytest.approx(-50.0)
    assert steering_gain(0.2, 0.0) is None  # no lift over a zero baseline
    assert steering_gain(float("nan"), 0.2) is None
    assert steering_gain(0.2, float("nan")) is None


class _RatingServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint on loopback that rates every text 1 or 2 from a hash
    of the prompt (``constant`` overrides): deterministic, and never 0 unless told, so the
    tiny LM's steering scores are non-zero and differ between selections."""

    constant: int | None = None

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send({"data": [{"id": "judge-model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        prompt = body["messages"][-1]["content"]
        digest = hashlib.sha256(prompt.encode()).digest()
        if "Rating:" not in prompt:  # an explanation: one per latent, from its examples
            answer = f"This neuron activates on the token {digest.hex()[:8]}"
        else:
            rating = 1 + digest[0] % 2 if self.constant is None else self.constant
            answer = f"Rating: [[{rating}]]"
        self._send({"choices": [{"message": {"role": "assistant", "content": answer}}]})


@contextlib.contextmanager
def rating_judge(monkeypatch: pytest.MonkeyPatch, constant: int | None = None) -> Iterator[dict]:
    """Options of an ``openai`` judge served by :class:`_RatingServer`."""
    handler = type("Handler", (_RatingServer,), {"constant": constant})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    try:
        yield {
            "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1",
            "model": "judge-model",
            "max_retries": 0,
        }
    finally:
        server.shutdown()
        server.server_close()


def _steer_runs(selection: str) -> list:
    return [r for r in runs_of(STEER_RUN_TYPE) if r.data.tags["selection"] == selection]


def _fixed_key(draw: Callable[..., list[int]]) -> Callable[..., list[int]]:
    """``draw`` (seeded_order / sample_latents) with the SAE key fixed."""

    def fixed(*args: object) -> list[int]:
        return draw(*args[:3], "test-sae", *args[4:])

    return fixed


def test_selection_run_logs_gain_over_the_none_run(
    tiny_lm_dir: str, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = register_tiny_sae(tiny_lm_dir)
    client = MlflowClient()
    # Latents are drawn seeded by the SAE's training run id, a fresh UUID per test run; with
    # it some draws give both selections equal mean ratings. A fixed key makes the draw (and
    # so this test) the same every run.
    monkeypatch.setattr(steer_module, "seeded_order", _fixed_key(latent_targets.seeded_order))
    monkeypatch.setattr(steer_module, "sample_latents", _fixed_key(latent_targets.sample_latents))
    with rating_judge(monkeypatch) as options:

        def run(selection: str, force: bool = False) -> object:
            # Latent mode: each selection steers its own latents toward their own (served)
            # explanations, so the scores of two selections differ.
            config = small_config(mode="latent", selection=selection, factors=(1.0, 4.0))
            (result,) = steer(uri, config, "openai", judge_options=options, force=force)
            return result

        # No none run yet: a selection computes it first, as a linked steer run of its own.
        selected = run("max_activation")
        (none_run,) = _steer_runs("none")
        (sel_run,) = _steer_runs("max_activation")
        assert selected.run_id == sel_run.info.run_id and not selected.reused
        assert selected.none_run_id == none_run.info.run_id
        assert none_run.data.tags["model_uri"] == uri
        assert none_run.data.tags["steer_mode"] == "latent"
        assert sel_run.data.tags["none_run_id"] == none_run.info.run_id
        # The baseline's config differs from the selection's in the selection only.
        none_params, sel_params = none_run.data.params, sel_run.data.params
        differing = {k for k in sel_params if sel_params[k] != none_params.get(k)}
        assert "selection" in differing and differing <= {"selection", "n_candidates"}
        s_sel = sel_run.data.metrics["steering_score"]
        s_none = none_run.data.metrics["steering_score"]
        assert s_none > 0 and s_sel != s_none  # the judge makes the gain a real number
        gain = 100 * (s_sel - s_none) / s_none
        assert sel_run.data.metrics["steering_gain"] == pytest.approx(gain, rel=1e-9)
        assert sel_run.data.metrics["none_steering_score"] == pytest.approx(s_none)
        assert sel_run.data.tags["steering_gain_status"] == "logged"
        assert selected.gain == pytest.approx(gain)
        assert "steering_gain" not in none_run.data.metrics
        # The none run's config is the one a plain selection=none steer uses: reused as is.
        plain_none = run("none")
        assert plain_none.reused and plain_none.run_id == none_run.info.run_id
        assert plain_none.none_run_id is None

        # A none run present beforehand is reused by the next selection, not recomputed.
        other = run("random")
        assert other.none_run_id == none_run.info.run_id
        assert len(_steer_runs("none")) == 1
        other_run = client.get_run(other.run_id)
        s_other = other_run.data.metrics["steering_score"]
        assert other_run.data.metrics["steering_gain"] == pytest.approx(
            100 * (s_other - s_none) / s_none, rel=1e-9
        )

        # Asking again reuses both runs; after the none run is recomputed, the reused
        # selection run's gain moves to the new baseline.
        again = run("max_activation")
        assert again.reused and again.run_id == selected.run_id
        assert len(runs_of(STEER_RUN_TYPE)) == 3
        new_none = run("none", force=True)
        assert new_none.run_id != none_run.info.run_id
        moved = run("max_activation")
        assert moved.reused and moved.none_run_id == new_none.run_id
        moved_run = client.get_run(moved.run_id)
        assert moved_run.data.tags["none_run_id"] == new_none.run_id
        s_new_none = new_none.metrics["steering_score"]
        assert moved_run.data.metrics["steering_gain"] == pytest.approx(
            100 * (s_sel - s_new_none) / s_new_none, rel=1e-9
        )


def test_zero_baseline_logs_no_gain_and_says_why(
    tiny_lm_dir: str, tracking_uri: str, concepts_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = register_tiny_sae(tiny_lm_dir)
    with rating_judge(monkeypatch, constant=0) as options:  # every rating 0: every score 0
        config = small_config(concepts=concepts_file, selection="random")
        (selected,) = steer(uri, config, "openai", judge_options=options)
    (none_run,) = _steer_runs("none")
    assert none_run.data.metrics["steering_score"] == 0.0
    sel_run = MlflowClient().get_run(selected.run_id)
    assert "steering_gain" not in sel_run.data.metrics and selected.gain is None
    assert sel_run.data.tags["steering_gain_status"] == (
        "undefined: the selection=none steering score is 0"
    )
    assert sel_run.data.tags["none_run_id"] == none_run.info.run_id


def test_versions_steered_together_get_the_runs_they_get_alone(
    tiny_lm_dir: str, tracking_uri: str
) -> None:
    """steer() over two versions stages them together (one batched generation and one judge
    call for both, the floor too): each run's generations, ratings and scores equal those of
    the same version steered alone, sampled at temperature 1 (per-prompt seeds)."""
    from project import generation

    uris = [register_tiny_sae(tiny_lm_dir)]
    torch.manual_seed(1)
    other = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=128, k=8))
    version = register_as_trained(
        other, registered_model=NAME, lm_name=tiny_lm_dir, layer=LAYER, target_l0=8
    )
    uris.append(f"models:/{NAME}/{version.version}")
    config = small_config(mode="latent", factors=(1.0, 4.0), batch_size=5)
    together = steer(uris, config, "offline")
    assert [r.model_uri for r in together] == uris
    alone = []
    for uri in uris:
        generation._ADDED_MEMO.clear()  # nothing remembered from the batched pass
        (result,) = steer(uri, config, "offline", force=True)
        alone.append(result)
    client = MlflowClient()
    for a, b in zip(together, alone, strict=True):
        assert a.run_id != b.run_id
        assert client.get_run(a.run_id).data.metrics["batched_runs"] == 2
        assert client.get_run(b.run_id).data.metrics["batched_runs"] == 1
        rows_a, rows_b = load_table(a.run_id, "generations"), load_table(b.run_id, "generations")
        assert any(g["method"] == "random" for g in rows_a)  # the floor was batched too
        assert rows_a == rows_b
        tables = [json.dumps(load_table(r.run_id, "per_concept"), sort_keys=True) for r in (a, b)]
        assert tables[0] == tables[1]  # as text: NaN cells compare equal
        for key in ("steering_score", "steering_score_lift", "random_steering_score_lift"):
            assert a.metrics[key] == pytest.approx(b.metrics[key], nan_ok=True)
    # The two SAEs steer different latents: the batch mixed different vectors.
    latents = [
        {p["latent"] for p in load_table(r.run_id, "per_concept") if p["method"] == "sae"}
        for r in together
    ]
    assert latents[0] != latents[1]


def test_a_version_whose_set_up_fails_leaves_the_others_logged(
    tiny_lm_dir: str, tracking_uri: str
) -> None:
    """Staged steering: a version that cannot be set up (no latent ever fires) is reported
    with its error and gets no run; the version beside it is steered and logged."""
    from evaluation.steering.steer import SteeringFailed

    good = register_tiny_sae(tiny_lm_dir)
    torch.manual_seed(2)
    dead = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=128, k=8))
    with torch.no_grad():
        dead.b_enc.fill_(-1e6)  # every pre-activation negative: nothing fires
    version = register_as_trained(
        dead, registered_model=NAME, lm_name=tiny_lm_dir, layer=LAYER, target_l0=8
    )
    dead_uri = f"models:/{NAME}/{version.version}"
    with pytest.raises(SteeringFailed, match="1 steer run") as failed:
        steer([good, dead_uri], small_config(mode="latent", factors=(1.0,)), "offline")
    by_uri = {r.model_uri: r for r in failed.value.results}
    assert by_uri[good].error is None and by_uri[good].run_id
    assert "fired" in (by_uri[dead_uri].error or "") and not by_uri[dead_uri].run_id
    logged = {r.data.tags["model_version"] for r in runs_of(STEER_RUN_TYPE)}
    assert logged == {good.rsplit("/", 1)[1]}
    # The command line over every version: exit code 3 (partly failed), the finished run
    # printed beside the failure.
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "evaluation.steering.steer",
            "--model_uri",
            f"models:/{NAME}",
            "--mode",
            "latent",
            "--n_concepts",
            "2",
            "--factors",
            "1",
            "--n_instructions",
            "2",
            "--max_new_tokens",
            "4",
            "--stats_n_tokens",
            "512",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"{dead_uri}: FAILED" in done.stdout and f"{good}: finished" in done.stdout


def test_versions_are_staged_a_bounded_number_at_a_time(
    tiny_lm_dir: str, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond STAGED_VERSIONS, versions are staged in groups (each staged SAE stays loaded)."""
    from evaluation.steering import steer as steer_module

    monkeypatch.setattr(steer_module, "STAGED_VERSIONS", 1)
    uris = [register_tiny_sae(tiny_lm_dir), register_tiny_sae(tiny_lm_dir)]
    results = steer(uris, small_config(mode="latent", factors=(1.0,)), "offline")
    assert [r.model_uri for r in results] == uris
    assert all(r.metrics["batched_runs"] == 1 for r in results)
