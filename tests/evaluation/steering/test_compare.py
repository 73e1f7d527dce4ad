"""The comparison (issue 20) on the tiny model: trained methods inside a concept-mode steer
run, their training data disjoint from the evaluation instructions, adapters logged so a
result can be generated again without training, paired differences from LoRA; bad settings
refused before any generation."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from test_steer import CONCEPTS, concepts_file, load_table, register_tiny_sae, small_config

from evaluation.steering.compare import COMPARE_DEFAULTS, compare, comparison_markdown
from evaluation.steering.config import SteerConfig
from evaluation.steering.protocol import Row, trained_seed
from evaluation.steering.trained.apply import generate_with_adapters
from evaluation.steering.trained.config import load_adapter
from evaluation.steering.trained.pairs import training_instructions, write_training_pairs
from project.concepts import Instruction, load_instructions
from project.generation import GenerationConfig
from project.judges import build_judge
from project.lm import load_lm

__all__ = ["concepts_file"]  # a fixture, imported for its use here


def _config(concepts: str) -> SteerConfig:
    return small_config(
        concepts=concepts,
        factors=(1.0, 4.0),
        supervised_k=(1, 2),
        supervised_min_support=3,
        trained=("lora", "loreft"),
        trained_pairs=4,
        trained_min_pairs=3,
        trained_epochs=1,
        trained_response_tokens=8,
    )


def test_training_instructions_never_include_the_concepts_evaluation_instructions() -> None:
    pool = load_instructions("builtin")
    held_out = pool[:10]
    chosen = training_instructions("c", pool, held_out, 48, "text", seed=0)
    assert len(chosen) == 48 and len({i.text for i in chosen}) == 48
    assert not {i.text for i in chosen} & {i.text for i in held_out}
    # Seeded by (seed, concept): the same draw again, another for another concept.
    assert chosen == training_instructions("c", pool, held_out, 48, "text", seed=0)
    assert chosen != training_instructions("d", pool, held_out, 48, "text", seed=0)
    # Asking for more than the pool holds gives all the rest.
    assert len(training_instructions("c", pool, held_out, 10_000, None, 0)) == len(pool) - 10


def test_written_pairs_keep_only_responses_that_carry_the_concept(tiny_lm) -> None:
    judge = build_judge("offline")
    instructions = [Instruction("Say something about the sea."), Instruction("Name a fish.")]
    prompts = [f"Talk about the ocean. {i.text}" for i in instructions]
    (pairs,) = write_training_pairs(
        ["the ocean"], [instructions], [prompts], tiny_lm, judge, response_tokens=6
    )
    assert pairs.n_written == 2 and pairs.writer.startswith("steered LM")
    ratings = {(i, r): rating for i, r, rating in pairs.written}
    assert all(ratings[p] >= 1.0 for p in pairs.pairs)
    assert {i for i, _r, _x in pairs.written} == {i.text for i in instructions}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trained": ("lora", "adapter")}, "unknown trained method 'adapter'"),
        ({"trained": ("lora",), "mode": "latent"}, "needs mode=concept"),
        ({"trained": ("lora", "lora")}, "repeats"),
        ({"trained_pairs": 1}, "trained_pairs"),
        ({"trained_lr": 2.0}, "trained_lr"),
    ],
)
def test_bad_trained_settings_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(COMPARE_DEFAULTS, **changes)


def test_compare_refuses_a_config_without_lora_or_supervision(tracking_uri: str) -> None:
    with pytest.raises(ValueError, match="needs mode=concept, trained methods including lora"):
        compare("models:/none/1", replace(COMPARE_DEFAULTS, trained=("loreft",)))
    with pytest.raises(ValueError, match="at least one supervised K"):
        compare("models:/none/1", replace(COMPARE_DEFAULTS, supervised_k=()))


def test_comparison_on_tiny_model(
    tiny_lm_dir: str, tracking_uri: str, concepts_file: str, tmp_path: Path
) -> None:
    uri = register_tiny_sae(tiny_lm_dir)
    config = _config(concepts_file)
    run_id, table = compare(uri, config)
    client = MlflowClient()
    metrics = client.get_run(run_id).data.metrics

    # Every method on the same concepts and instructions.
    generations = load_table(run_id, "generations")
    methods = {g["method"] for g in generations}
    assert methods == {
        "unsteered", "prompt", "sae", "diffmean", "random",
        "sae_sup_k1", "sae_sup_k2", "lora", "loreft",
    }  # fmt: skip
    per_method = {m: {(g["concept"], g["instruction"]) for g in generations if g["method"] == m}
                  for m in methods}  # fmt: skip
    assert all(cells == per_method["unsteered"] for cells in per_method.values())
    # A factor-less method: one sample per factor row, each with its own seed.
    lora_rows = [g for g in generations if g["method"] == "lora"]
    assert {g["factor"] for g in lora_rows} == set(config.factors)

    # Training data: written per concept, none on an evaluation instruction of that concept.
    pairs = load_table(run_id, "training_pairs")
    assert {p["concept"] for p in pairs} == {c["concept"] for c in CONCEPTS}
    for concept in {c["concept"] for c in CONCEPTS}:
        trained_on = {p["instruction"] for p in pairs if p["concept"] == concept}
        evaluated = {g["instruction"] for g in generations if g["concept"] == concept}
        assert trained_on and not trained_on & evaluated
    written = [p for p in pairs if p["writer"] != "concept examples"]
    from_examples = [p for p in pairs if p["writer"] == "concept examples"]
    assert metrics["trained_pairs_written"] == len(written) == 2 * config.trained_pairs
    assert metrics["trained_pairs_kept"] == sum(p["kept"] for p in written)
    # Kept pairs are trained on; a concept with fewer than 3 kept is topped up to 3 with its own
    # positive example texts, answering instructions whose written response was not kept.
    assert all(p["trained_on"] == p["kept"] for p in written)
    assert metrics["trained_pairs_from_examples"] == len(from_examples)
    positives = {c["concept"]: set(c["positives"]) for c in CONCEPTS}
    for concept in positives:
        mine = [p for p in pairs if p["concept"] == concept and p["trained_on"]]
        assert len(mine) >= 3
        extra = [p for p in from_examples if p["concept"] == concept]
        assert all(p["response"] in positives[concept] for p in extra)
        kept = {p["instruction"] for p in written if p["concept"] == concept and p["kept"]}
        assert not kept & {p["instruction"] for p in extra}
    for method in ("lora", "loreft"):
        assert metrics[f"{method}_parameters"] > 0 and metrics[f"{method}_train_tokens"] > 0
        # Paired differences from LoRA and from the unsteered model, for every method.
        assert f"{method}_minus_unsteered_concept" in metrics
    for method in ("sae", "sae_sup_k1", "sae_sup_k2", "loreft", "diffmean", "prompt"):
        assert f"{method}_minus_lora_steering" in metrics
        assert f"{method}_minus_lora_steering_lift_ci_high" in metrics
    assert "lora_minus_lora_steering" not in metrics

    # The comparison table: one row per method, LoRA's own difference undefined.
    assert table["method"][:2] == ["prompt", "lora"]
    lora_row = table["method"].index("lora")
    assert math.isnan(table["minus_lora"][lora_row])
    sup = table["method"].index("sae_sup_k1")
    assert table["minus_lora"][sup] == pytest.approx(metrics["sae_sup_k1_minus_lora_steering"])
    assert table["axbench_gemma2"][lora_row] == 0.615
    assert "| LoRA |" in comparison_markdown(table)
    assert client.list_artifacts(run_id, "tables")  # comparison.json beside the others

    # The adapters are artifacts: loaded back, they generate the logged LoRA text again.
    folder = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="adapters/lora", dst_path=str(tmp_path)
    )
    first = sorted(Path(folder).iterdir())[0]
    adapter = load_adapter(first)
    row = next(g for g in lora_rows if first.name[3:].startswith(g["concept"].split()[0]))
    lm = load_lm(tiny_lm_dir)
    generation = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=config.seed,
        batch_size=config.batch_size,
    )
    seed = trained_seed(
        config.seed,
        Row("lora", 0, Instruction(row["instruction"]), row["split"], row["factor"], row["prompt"]),
    )
    (text,) = generate_with_adapters(lm, [row["prompt"]], [adapter], generation, seeds=[seed])
    assert text == row["text"]


def test_trained_layers_out_of_range_are_refused_before_any_generation(
    tiny_lm_dir: str, tracking_uri: str, concepts_file: str
) -> None:
    uri = register_tiny_sae(tiny_lm_dir)
    config = replace(_config(concepts_file), trained_layers=(1, 9))
    with pytest.raises(ValueError, match="layer 9 is out of range.*valid layers are 0..3"):
        compare(uri, config)
    assert not MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()],
        "tags.`saeflow.run_type` = 'steer'",
    )


def test_a_concept_without_positives_is_refused(tiny_lm_dir: str, tmp_path: Path) -> None:
    path = tmp_path / "concepts.jsonl"
    path.write_text(
        '{"concept": "cooking", "positives": [], "negatives": ["x y z"]}\n'
        + '{"concept": "the sea", "positives": ["waves and tides"], "negatives": []}\n'
    )
    with pytest.raises(ValueError, match="positives"):
        compare("models:/none/1", replace(_config(str(path))))
