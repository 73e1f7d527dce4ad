"""The per-version scores table (one linked run per version and config, reused), its plots,
and the criteria as steering selections."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import register_as_trained
from mlflow.tracking import MlflowClient

from evaluation.selection import criteria as criteria_module
from evaluation.selection.config import SelectionConfig
from evaluation.selection.criteria import (
    CRITERIA,
    criterion,
    register_selections,
    supervised_over_concepts,
)
from evaluation.selection.rules import top_k
from evaluation.selection.scores import intervened_scores
from evaluation.selection.table import SCORE_COLUMNS, scores_for_version
from project.lm import LoadedLM, load_lm
from project.saes import SAEConfig, build_sae
from project.tracking import RUN_TYPE_TAG

LAYER = 1
NAME = "sae-tiny-selection"
FAST = {"n_tokens": 512, "context_size": 64, "input_min_examples": 2, "batch_latents": 48}


@pytest.fixture(scope="module")
def dir_lm(tiny_lm_dir: str) -> LoadedLM:
    return load_lm(tiny_lm_dir)


def _register(dir_lm: LoadedLM):  # noqa: ANN202 - (version, sae)
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=48, k=8)).eval()
    mv = register_as_trained(
        sae, registered_model=NAME, lm_name=dir_lm.name, layer=LAYER, target_l0=8
    )
    return MlflowClient().get_model_version(NAME, mv.version), sae


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def test_scores_table_is_logged_once_and_reused(tracking_uri: str, dir_lm: LoadedLM) -> None:
    mv, sae = _register(dir_lm)
    config = SelectionConfig(**FAST)
    scores, run_id, reused = scores_for_version(mv, sae, dir_lm, LAYER, config)
    assert not reused
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.tags["eval"] == "selection"
    assert run.data.tags["registered_model"] == NAME
    assert run.data.tags["model_version"] == str(mv.version)
    assert client.get_model_version(NAME, mv.version).tags["eval.selection.run_id"] == run_id
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert artifacts == {"plots/dtc_distribution.png", "plots/output_score_vs_dtc.png"}
    assert set(scores) == set(SCORE_COLUMNS)
    assert all(len(v) == 48 for v in scores.values())
    assert "mean_dtc_in_place" in run.data.metrics
    # m_i is the steering table's when that run exists (same text, same definition).
    stats_run = run.data.params["latent_stats_run_id"]
    if stats_run != "scan":
        stats = mlflow.load_table("latent_stats.json", run_ids=[stats_run]).sort_values("latent")
        assert torch.allclose(
            scores["max_activation"], torch.tensor(stats["max_activation"].to_numpy()).double()
        )

    again, run_again, reused = scores_for_version(mv, sae, dir_lm, LAYER, config)
    assert reused and run_again == run_id
    assert all(_same(again[k], scores[k]) for k in SCORE_COLUMNS)

    _, other_run, reused = scores_for_version(
        mv, sae, dir_lm, LAYER, SelectionConfig(**FAST, alpha=5.0)
    )
    assert not reused and other_run != run_id


def test_table_reads_a_logged_latent_stats_run_and_never_measures_one(
    tracking_uri: str, dir_lm: LoadedLM
) -> None:
    """A fresh version's table takes m_i and frequency from its own scan (no second LM pass
    for a latent_stats run); once steering has logged that run for the same text, the table
    reads it. Both give the same figures."""
    from evaluation.selection.config import LatentStatsConfig
    from evaluation.selection.latent_stats import latent_stats_for_version

    mv, sae = _register(dir_lm)
    config = SelectionConfig(**FAST)
    scores, run_id, _ = scores_for_version(mv, sae, dir_lm, LAYER, config)
    client = MlflowClient()
    assert client.get_run(run_id).data.params["latent_stats_run_id"] == "scan"
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments, f"tags.`{RUN_TYPE_TAG}` = 'latent_stats'") == []

    same_text = LatentStatsConfig(n_tokens=FAST["n_tokens"], context_size=FAST["context_size"])
    stats, stats_run, _ = latent_stats_for_version(mv, sae, dir_lm, LAYER, same_text)
    assert torch.allclose(scores["max_activation"], stats["max_activation"].double(), rtol=1e-5)
    assert torch.allclose(scores["firing_frequency"], stats["firing_frequency"].double())
    _, other_run, _ = scores_for_version(mv, sae, dir_lm, LAYER, SelectionConfig(**FAST, alpha=5.0))
    assert client.get_run(other_run).data.params["latent_stats_run_id"] == stats_run


def test_criteria_plug_into_a_steering_registry(
    tiny_lm: LoadedLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evaluation.selection.registry import SELECTIONS, SelectionContext

    # Two small labelled concepts (the shipped stdlib set takes long to gather).
    concepts = tmp_path / "concepts.jsonl"
    code = "def parse(text):\n    return [int(part) for part in text.split(',')]"
    prose = "The weather in spring is mild, and the evenings grow longer every week."
    concepts.write_text(
        json.dumps({"concept": "code", "positives": [code] * 6, "negatives": [prose] * 6})
        + "\n"
        + json.dumps({"concept": "weather", "positives": [prose] * 6, "negatives": [code] * 6})
    )
    monkeypatch.setattr(criteria_module, "SUPERVISED_CONCEPTS", str(concepts))

    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=48, k=8)).eval()
    max_F = torch.rand(48, generator=torch.Generator().manual_seed(1)) + 0.1
    freq_F = torch.full((48,), 0.01)
    freq_F[:6] = 0.0  # dead latents are never selected
    context = SelectionContext(sae, tiny_lm, LAYER, max_F, freq_F, seed=0)
    registry = dict(SELECTIONS)
    register_selections(registry)
    assert set(CRITERIA) <= set(registry) and "none" in registry

    chosen = registry["dtc"](context)
    expected = intervened_scores(sae, tiny_lm, LAYER, SelectionConfig(), max_activation_F=max_F)
    live = freq_F > 0
    # 42 live latents: each criterion keeps its top 10% = 4, best first.
    assert chosen == top_k(expected["dtc_in_place"], 4, "abs", live)
    assert registry["output_score"](context) == top_k(expected["output_score"], 4, "up", live)
    assert registry["max_activation"](context)[0] == int(torch.where(live, max_F, -1.0).argmax())
    randomly = registry["random"](context)
    assert len(randomly) == 4 and all(i >= 6 for i in randomly)
    assert len(registry["dtc_down"](context)) == len(registry["dtc_alone"](context)) == 4
    supervised = registry["supervised"](context)
    f1_F = supervised_over_concepts(context, str(concepts))
    assert 1 <= len(supervised) <= 4 and all(i >= 6 for i in supervised)
    assert supervised == top_k(f1_F, len(supervised), "up", live)
    with pytest.raises(ValueError, match="unknown criterion 'best'; valid criteria: dtc"):
        criterion("best")
    assert not math.isnan(float(expected["dtc_in_place"].sum()))


def test_mlproject_entry_fits_the_command_line() -> None:
    """``mlflow run . -e selection_table`` builds a command the table's CLI accepts: every
    declared parameter is a flag of it, the defaults give the default config, and values
    MLflow passes (declared or not, floats as "3.0") reach the config."""
    import shlex

    import yaml
    from mlflow.projects import _project_spec

    from evaluation.selection.table import build_parser, config_from_args

    root = Path(__file__).resolve().parents[3]
    entry = yaml.safe_load((root / "MLproject").read_text())["entry_points"]["selection_table"]
    flags = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert set(entry["parameters"]) <= flags
    assert entry["parameters"]["model_uri"] == {"type": "string"}  # required, no default

    command = _project_spec.load_project(str(root)).get_entry_point("selection_table")

    def parse(params: dict[str, str]) -> SelectionConfig:
        argv = shlex.split(command.compute_command(params, "/unused"))
        assert argv[:3] == ["python", "-m", "evaluation.selection.table"]
        args = build_parser().parse_args(argv[3:])
        assert args.model_uri == params["model_uri"]
        return config_from_args(args)

    assert parse({"model_uri": "models:/X/1"}) == SelectionConfig()
    changed = parse(
        {"model_uri": "models:/X/1", "alpha": "5", "k": "3.0", "dtc_positions": "all"}
        | {"n_tokens": "4096", "batch_latents": "128.0"}  # undeclared: passed through
    )
    assert (changed.alpha, changed.k, changed.dtc_positions) == (5.0, 3, "all")
    assert (changed.n_tokens, changed.batch_latents) == (4096, 128)
    with pytest.raises(ValueError, match="unknown dtc_positions 'some'"):
        parse({"model_uri": "models:/X/1", "dtc_positions": "some"})
