"""The whole study (``mlflow run .``'s main entry) end to end on the tiny random LM."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from scipy import stats

from analysis.stats import add_sparsity_rank, bca_interval, psi_point
from analysis.study import STUDY_RUN_TAG, StudyConfig, config_from_argv, run_study
from project.tracking import RUN_TYPE_TAG
from training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
# Run types whose count must not grow when a finished study is started again.
REUSED_RUN_TYPES = (
    "harvest",
    "train",
    "eval",
    "steer",
    "latent_stats",
    "selection_table",
    "tune_dtc",
    "tune_dtc_trial",
)


def tiny_study(lm_dir: str, storage: Path) -> StudyConfig:
    """2 architectures x 2 sparsities on the tiny LM, each step at its smallest useful size."""
    return StudyConfig(
        lms=lm_dir,
        layers="1",
        architectures="topk,relu",
        target_l0s="4,8",
        n_tokens=4096,
        context_size=64,
        training_tokens=4096,
        expansion=2,
        batch_size=512,
        evals="autointerp",
        autointerp_latents=4,
        eval_options={
            "autointerp": {"n_tokens": "3072", "context_size": "64", "min_firings": "10"}
        },
        selections="none,dtc",
        n_concepts=1,
        factors="4",
        n_instructions=2,
        max_new_tokens=3,
        stats_n_tokens=1024,
        tune_n_trials=2,
        tune_n_concepts=1,
        tune_storage=str(storage),
        n_resamples=100,
        # On a random LM every steering score is 0 (nothing is on concept), so τ_b would be
        # undefined; the join and the statistics are checked on a steer metric that varies
        # by SAE (the median max activation the factors scale).
        utility_metric="reference_scale",
    )


def count_runs(client: MlflowClient) -> dict[str, int]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    counts: dict[str, int] = {}
    for run in client.search_runs(experiments, max_results=10_000):
        kind = run.data.tags.get(RUN_TYPE_TAG, "")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def mu_g_from_runs(client: MlflowClient, versions: list[str]) -> tuple[list[float], list[float]]:
    """µ (autointerp score of the newest FINISHED autointerp eval run) and g (the utility
    metric of the newest FINISHED latent-mode steer run without selection) of each version,
    read straight from the runs."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    mu, g = [], []
    for uri in versions:
        found = {}
        for kind, extra in (
            ("eval", "tags.eval = 'autointerp'"),
            ("steer", "tags.selection = 'none'"),
        ):
            (run,) = client.search_runs(
                experiments,
                f"tags.`{RUN_TYPE_TAG}` = '{kind}' AND tags.model_uri = '{uri}' AND {extra} "
                "AND attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            found[kind] = run.data.metrics
        mu.append(found["eval"]["autointerp_score"])
        g.append(found["steer"]["reference_scale"])
    return mu, g


def test_study_end_to_end_then_reused(tiny_lm_dir: str, tracking_uri: str, tmp_path: Path) -> None:
    client = MlflowClient()
    config = tiny_study(tiny_lm_dir, tmp_path / "optuna.db")
    first = run_study(config)

    assert first.failures == []
    assert len(first.versions) == 4
    assert len(first.new_runs("train")) == 4 and len(first.new_runs("harvest")) == 1
    assert {r.detail for r in first.new_runs("steer")} == {"none", "dtc"}
    assert len(first.new_runs("steer")) == 8 and len(first.new_runs("tune")) == 1
    study_run = client.get_run(first.run_id)
    assert study_run.data.tags[RUN_TYPE_TAG] == "study"
    assert study_run.info.status == "FINISHED"
    for step in ("harvest", "train", "evaluate", "steer", "tune", "analyze", "total"):
        assert study_run.data.metrics[f"seconds_{step}"] > 0
    # Was steering measured? The lift score pooled over every target of the steer runs.
    pooled = study_run.data.metrics
    assert pooled["pooled_n_targets"] == (
        pooled["pooled_n_targets_none"] + pooled["pooled_n_targets_dtc"]
    )
    assert pooled["pooled_n_runs_none"] == pooled["pooled_n_runs_dtc"] == 4
    assert 0.0 <= pooled["pooled_steering_score_lift"] <= 2.0
    assert 0.0 <= pooled["pooled_free_concept_share"] <= 1.0
    # ... and the concept rating alone, the SAE's against the same-norm random floor's.
    assert 0.0 <= pooled["pooled_concept_lift"] <= 2.0
    assert pooled["pooled_concept_lift_minus_random"] == pytest.approx(
        pooled["pooled_concept_lift"] - pooled["pooled_random_concept_lift"]
    )
    # The steps' runs are findable from the study: children (nested or adopted) with its tag.
    children = client.search_runs(
        [study_run.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{first.run_id}'",
        max_results=1000,
    )
    child_types = {c.data.tags.get(RUN_TYPE_TAG) for c in children}
    assert {"train", "eval", "steer", "tune_dtc", "analyze"} <= child_types
    assert all(c.data.tags[STUDY_RUN_TAG] == first.run_id for c in children
               if c.data.tags.get(RUN_TYPE_TAG) in {"train", "eval", "steer", "analyze"})  # fmt: skip

    # The report: τ_b with its interval, the Ψ's and the plots, as artifacts of the analyze run.
    analyze_id = next(r.run_id for r in first.runs if r.step == "analyze" and r.detail == "none")
    metrics = client.get_run(analyze_id).data.metrics
    assert metrics["n_saes"] == 4
    artifacts = {a.path for a in client.list_artifacts(analyze_id)}
    assert {"report.html", "study_table.csv", "mu_vs_g.png"} <= artifacts
    page = Path(mlflow.artifacts.download_artifacts(run_id=analyze_id, artifact_path="report.html"))
    text = page.read_text()
    assert "data:image/png;base64," in text and "Ψ_A" in text and "τ_b" in text
    assert first.report_paths["none"].endswith(f"{analyze_id}/artifacts/report.html")
    assert "dtc" in first.report_paths

    # τ_b and Ψ recomputed from the logged runs alone.
    mu, g = mu_g_from_runs(client, first.versions)
    expected = stats.kendalltau(mu, g, variant="b").statistic
    assert not math.isnan(expected)
    assert metrics["tau_b"] == pytest.approx(expected)
    assert study_run.data.metrics["tau_b"] == pytest.approx(expected)
    # Its interval is the BCa bootstrap of those pairs (with 4 SAEs it may be undefined: many
    # resamples repeat one SAE; the report then says so instead of logging a number).
    interval = bca_interval(mu, g, n_resamples=config.n_resamples, seed=config.seed)
    assert client.get_run(analyze_id).data.tags["tau_b_ci_method"] == interval.method
    assert (
        "no bootstrap interval" if interval.method == "none" else f"95% {interval.method} bootstrap"
    ) in text
    for bound in ("low", "high"):
        reported = first.headline[f"tau_b_ci_{bound}"]
        assert reported == pytest.approx(getattr(interval, bound), nan_ok=True)
        assert (f"tau_b_ci_{bound}" in metrics) == (not math.isnan(reported))
    table = add_sparsity_rank(
        pd.read_csv(
            mlflow.artifacts.download_artifacts(run_id=analyze_id, artifact_path="study_table.csv")
        )
    )
    assert sorted(zip(table["mu"], table["g"], strict=True)) == sorted(zip(mu, g, strict=True))
    psi = psi_point(table, "mu", "g")
    for key in ("psi_A", "psi_B", "psi_C", "psi"):
        if math.isnan(psi[key]):
            assert key not in metrics
        else:
            assert metrics[key] == pytest.approx(psi[key])

    # Started again: nothing is trained, evaluated, steered or tuned anew; a new report.
    before = count_runs(client)
    second = run_study(config)
    after = count_runs(client)
    assert second.failures == [] and sorted(second.versions) == sorted(first.versions)
    for kind in REUSED_RUN_TYPES:
        assert after.get(kind, 0) == before.get(kind, 0), kind
    assert after["analyze"] == before["analyze"] + 2
    assert after["study"] == before["study"] + 1
    assert [r for r in second.runs if r.step != "analyze" and not r.reused] == []
    assert second.headline["tau_b"] == pytest.approx(first.headline["tau_b"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architectures": "topk", "target_l0s": "8"}, "Kendall τ needs at least 3"),
        ({"architectures": "topk,swish"}, "architecture 'swish' is unknown"),
        ({"target_l0s": "8,x"}, "target_l0s='8,x' must be comma-separated ints"),
        ({"layers": "1,2"}, "gives 2 layer"),
        ({"evals": "core"}, "must include autointerp"),
        ({"selections": "dtc,none"}, "must start with none"),
        ({"selections": "none,magic"}, "unknown selection 'magic'"),
        ({"analyze_selections": "output_score", "selections": "none,dtc"}, "does not steer"),
        ({"tune_sae": "gated:8"}, "tune_sae='gated:8'"),
        ({"eval_options": {"core": {"n_tokens": "8"}}}, "not in evals"),
        ({"eval_options": {"autointerp": {"nope": "1"}}}, "no config field 'nope'"),
        ({"judge": "oracle"}, "unknown judge 'oracle'"),
    ],
)
def test_bad_input_is_named_before_any_work(changes: dict, message: str, tmp_path: Path) -> None:
    config = tiny_study("unused-lm", tmp_path / "optuna.db")
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_embedded_lms_get_their_own_layers() -> None:
    config = StudyConfig(lms="smollm2-135m-instruct,gemma-3-270m")
    assert config.layer_for() == {"smollm2-135m-instruct": 10, "gemma-3-270m": 6}
    assert config.tune_target() == ("topk", 16)


def test_main_entry_point_passes_every_parameter() -> None:
    """MLproject's main command parses into a StudyConfig, each parameter reaching its field."""
    entry = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["main"]
    params = entry["parameters"]
    values = {name: str(spec["default"]) for name, spec in params.items()}
    argv = entry["command"].split()[3:]  # after "python -m analysis.study"
    argv = [a.format(**values) for a in argv]
    config = config_from_argv([*argv, "--autointerp.n_tokens", "8192"])
    for name, text in values.items():
        value = getattr(config, name)
        assert str(value) == text or float(value) == float(text), name
    assert config.eval_options == {"autointerp": {"n_tokens": "8192"}}
    config.validate()
    assert entry["command"].split()[:3] == ["python", "-m", "analysis.study"]


def test_command_line_bad_input_exits_2(tracking_uri: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "analysis.study", "--target_l0s", "8,x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "target_l0s='8,x'" in done.stderr
    assert count_runs(MlflowClient()).get("study", 0) == 0


def _registered_as_trained(config: TrainConfig, lm_name: str, code: str) -> str:
    """A version as train_and_register leaves it (config artifact, code tag), no training."""
    from project.registry import default_registered_model_name
    from training.run import TRAIN_CONFIG_ARTIFACT, TRAINING_CODE_TAG

    client = MlflowClient()
    name = default_registered_model_name(lm_name, config.layer)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    with mlflow.start_run() as run:
        mlflow.set_tags({RUN_TYPE_TAG: "train", TRAINING_CODE_TAG: code})
        mlflow.log_dict(config.as_params(), TRAIN_CONFIG_ARTIFACT)
    client.create_model_version(
        name,
        source=f"runs:/{run.info.run_id}/sae",
        run_id=run.info.run_id,
        tags={
            "architecture": config.architecture,
            "target_l0": str(config.target_l0),
            "source": "saeflow-train",
            "training_run_id": run.info.run_id,
        },
    )
    return run.info.run_id


def test_a_trained_version_is_reused_only_by_the_same_training_code(tracking_uri: str) -> None:
    from analysis.study import find_trained_version
    from training.run import training_code_version

    config = tiny_study("tiny-lm", Path("unused")).train_config("tiny-lm", 1, "topk", 4)
    _registered_as_trained(config, "tiny-lm", code="0.1.0+src.another-trainer")
    assert find_trained_version(config, "tiny-lm") is None  # a trainer fix retrains
    current = _registered_as_trained(config, "tiny-lm", code=training_code_version())
    found = find_trained_version(config, "tiny-lm")
    assert found is not None and found.tags["training_run_id"] == current


def test_the_tune_study_name_and_its_reuse_include_the_code_version(tracking_uri: str) -> None:
    from analysis.study import find_finished_tune
    from analysis.tune_dtc import STUDY_TAG, TUNE_RUN_TYPE, TuneConfig, study_name
    from project.runs import saeflow_version

    client = MlflowClient()
    client.create_registered_model("m")
    mv = client.create_model_version("m", source="runs:/x/sae")
    config = TuneConfig(n_trials=2)
    names = {code: study_name(mv, config, "offline", code_version=code) for code in ("a", "b")}
    assert names["a"] != names["b"]
    assert study_name(mv, config, "offline") == study_name(
        mv, config, "offline", code_version=saeflow_version()
    )
    uri = "models:/m/1"
    for code, name in names.items():
        with mlflow.start_run() as run:
            mlflow.set_tags({RUN_TYPE_TAG: TUNE_RUN_TYPE, "model_uri": uri, STUDY_TAG: name,
                             "n_trials": "2"})  # fmt: skip
            mlflow.log_metric("subset_size", 1.0)
        if code == "a":
            first = run.info.run_id
    assert find_finished_tune(uri, config, names["a"]) == first
    assert find_finished_tune(uri, config, names["b"]) == run.info.run_id
    assert find_finished_tune(uri, config, study_name(mv, config, "offline")) is None
