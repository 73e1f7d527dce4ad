"""The analyze entry point on a real SQLite tracking store with a synthetic study."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from analysis.analyze import AnalyzeConfig, analyze
from analysis.collect import StudyData, collect
from analysis.stats import add_sparsity_rank, psi_point
from analysis.synthetic import SyntheticStudy, write_study
from project.cli import BadInputError
from project.tracking import RUN_TYPE_TAG, configure_tracking

STUDY = SyntheticStudy(target_l0s=(16, 64), eval_runs_per_version=2, seed=3)


@pytest.fixture
def study_store(tracking_uri: str) -> MlflowClient:
    configure_tracking(tracking_uri)
    client = MlflowClient()
    write_study(client, "study", STUDY)
    return client


def _independent_mu_g(client: MlflowClient, selection: str) -> dict[tuple[str, str], list[float]]:
    """µ and g per version straight from the runs: newest eval run, steer run of ``selection``."""
    out: dict[tuple[str, str], list[float]] = {}
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        max_results=10_000,
        order_by=["attributes.start_time ASC"],
    )
    for run in runs:  # oldest first: later runs overwrite
        tags = run.data.tags
        key = (tags.get("registered_model"), tags.get("model_version"))
        if tags.get(RUN_TYPE_TAG) == "eval":
            out.setdefault(key, [math.nan, math.nan])[0] = run.data.metrics["autointerp_score"]
        if tags.get(RUN_TYPE_TAG) == "steer" and tags.get("selection") == selection:
            out.setdefault(key, [math.nan, math.nan])[1] = run.data.metrics["steering_score"]
    return out


def test_report_matches_an_independent_recomputation(study_store: MlflowClient) -> None:
    result = analyze(AnalyzeConfig(selection="dtc", n_resamples=200))
    run = study_store.get_run(result.run_id)
    assert run.data.tags[RUN_TYPE_TAG] == "analyze"
    metrics = run.data.metrics
    n_versions = len(STUDY.lms) * len(STUDY.architectures) * len(STUDY.target_l0s)
    assert metrics["n_saes"] == n_versions

    truth = _independent_mu_g(study_store, "dtc")
    assert len(truth) == n_versions
    mu = [v[0] for _, v in sorted(truth.items())]
    g = [v[1] for _, v in sorted(truth.items())]
    assert all(m > 0 for m in mu)  # the newest eval run won over the older 0.0 duplicate
    assert metrics["tau_b"] == pytest.approx(stats.kendalltau(mu, g, variant="b").statistic)
    assert metrics["tau_b_ci_low"] <= metrics["tau_b"] <= metrics["tau_b_ci_high"]
    assert metrics["tau_b"] > 0.2  # the synthetic study couples g to µ

    # Ψ from the logged table artifact equals Ψ from the independently read runs.
    table = result.report.table
    assert sorted(zip(table["mu"], table["g"], strict=True)) == sorted(zip(mu, g, strict=True))
    psi = psi_point(add_sparsity_rank(table), "mu", "g")
    for key in ("psi_A", "psi_B", "psi_C", "psi"):
        assert metrics[key] == pytest.approx(psi[key])
    assert {"gain_tau_b", "gain_psi"} <= set(metrics)

    phases = {"collect", "statistics", "plots", "report and logging"}
    assert set(result.times.wall) == set(result.times.cpu) == phases
    assert all(seconds > 0 for seconds in result.times.wall.values())

    artifacts = {a.path for a in study_store.list_artifacts(result.run_id)}
    assert {"report.html", "study_table.csv", "group_taus.csv", "mu_vs_g.png"} <= artifacts
    assert "tau_by_group.png" in artifacts and "steering_by_architecture.png" in artifacts
    page = Path(
        mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="report.html")
    )
    text = page.read_text()
    assert "data:image/png;base64," in text and "0.2979" in text  # plots embedded, paper beside
    rows = list(csv.DictReader(io.StringIO(
        Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="study_table.csv")).read_text()
    )))  # fmt: skip
    assert len(rows) == n_versions


def test_missing_metrics_are_listed_and_controls_left_out(study_store: MlflowClient) -> None:
    # One more version with an eval run but no steer run, and a random-init control.
    name = "sae-lm-a-l4-resid-post"
    lonely = study_store.create_model_version(name, source="runs:/x/sae", tags={"lm_name": "lm-a"})
    experiment = study_store.get_experiment_by_name("study").experiment_id
    run = study_store.create_run(
        experiment,
        tags={RUN_TYPE_TAG: "eval", "registered_model": name, "model_version": lonely.version},
    )
    study_store.log_metric(run.info.run_id, "autointerp_score", 0.7)
    study_store.set_terminated(run.info.run_id)
    data = collect(study_store)
    assert (f"models:/{name}/{lonely.version}", "no steering_score (none)") in data.missing
    result = analyze(AnalyzeConfig(n_resamples=200))
    assert f"models:/{name}/{lonely.version}" in [uri for uri, _ in result.report.missing]


def test_gain_is_over_the_none_run_the_selection_was_measured_against(
    study_store: MlflowClient,
) -> None:
    """steer logs none_steering_score on a selection run (its own config's none run); a newer
    none run with another config must not become that run's baseline."""
    before = {
        (r["registered_model"], r["version"]): r
        for r in _rows(collect(study_store, selection="dtc"))
    }
    (key, row), (other_key, other) = list(before.items())[:2]
    experiment = study_store.get_experiment_by_name("study").experiment_id
    dtc_run = study_store.search_runs(
        [experiment],
        f"tags.registered_model = '{key[0]}' AND tags.model_version = '{key[1]}' "
        "AND tags.selection = 'dtc'",
    )[0]
    study_store.log_metric(dtc_run.info.run_id, "none_steering_score", 0.5)
    for version_key in (key, other_key):  # a newer none run of another config, both versions
        run = study_store.create_run(
            experiment,
            tags={
                RUN_TYPE_TAG: "steer",
                "steer_mode": "latent",
                "selection": "none",
                "registered_model": version_key[0],
                "model_version": str(version_key[1]),
            },
        )
        study_store.log_metric(run.info.run_id, "steering_score", 0.9)
        study_store.set_terminated(run.info.run_id)
    after = {
        (r["registered_model"], r["version"]): r
        for r in _rows(collect(study_store, selection="dtc"))
    }
    assert after[key]["g_none"] == 0.5
    assert after[key]["gain"] == pytest.approx((row["g"] - 0.5) / 0.5 * 100)
    # Without a logged baseline the newest none run is used.
    assert after[other_key]["g_none"] == 0.9 != other["g_none"]


def _rows(data: StudyData) -> list[dict]:
    return data.table.to_dict("records")


def test_too_few_saes_is_a_clear_error(tracking_uri: str) -> None:
    configure_tracking(tracking_uri)
    write_study(
        MlflowClient(),
        "tiny",
        SyntheticStudy(lms=("x",), architectures=("topk",), target_l0s=(8, 16)),
    )
    with pytest.raises(BadInputError, match="only 2 SAE"):
        analyze(AnalyzeConfig(n_resamples=200))
    runs = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()],
        filter_string=f"tags.`{RUN_TYPE_TAG}` = 'analyze'",
    )
    assert runs == []  # nothing half-logged


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steer_mode", "both", "steer_mode"),
        ("sparsity", "k", "sparsity"),
        ("n_resamples", 5, "n_resamples"),
    ],
)
def test_bad_config_names_the_value(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AnalyzeConfig(**{field: value}).validate()


def test_unknown_experiment_is_named(tracking_uri: str) -> None:
    configure_tracking(tracking_uri)
    with pytest.raises(ValueError, match="'nope' not found|\\['nope'\\] not found"):
        analyze(AnalyzeConfig(experiments="nope"))


def test_small_pages_read_the_same_study(
    study_store: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import analysis.collect

    whole = collect(study_store, selection="dtc")
    runs_per_version = STUDY.eval_runs_per_version + len(STUDY.selections)
    # Pages far smaller than the study: every run must be read once, in the same order.
    monkeypatch.setattr(analysis.collect, "PAGE_SIZE", 7)
    paged = collect(study_store, selection="dtc")
    assert len(whole.table) * runs_per_version > 7 * 5
    assert paged.table.equals(whole.table)
    assert paged.missing == whole.missing
    assert paged.steering_by_selection.equals(whole.steering_by_selection)
