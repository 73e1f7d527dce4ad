"""The analyze entry point on a real SQLite tracking store with a synthetic study."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from analysis.analyze import AnalyzeConfig, analyze, correlation
from analysis.collect import MixedRunsError, StudyData, collect
from analysis.stats import add_sparsity_rank, bca_interval, psi_point
from analysis.synthetic import SyntheticStudy, steer_params, write_study, write_study_run
from project.cli import BadInputError
from project.tracking import RUN_TYPE_TAG, configure_tracking

STUDY = SyntheticStudy(target_l0s=(16, 64), eval_runs_per_version=2, seed=3)


@pytest.fixture
def study_store(tracking_uri: str) -> MlflowClient:
    configure_tracking(tracking_uri)
    client = MlflowClient()
    write_study(client, "study", STUDY)
    return client


def _steer_run(
    client: MlflowClient,
    experiment: str,
    key: tuple[str, str],
    selection: str,
    metrics: dict[str, float],
    *,
    judge: str = "offline",
    n_concepts: int = 4,
    tags: dict[str, str] | None = None,
) -> str:
    """A FINISHED steer run about version ``key``, with the params steer logs."""
    run_id = client.create_run(
        experiment,
        tags={
            RUN_TYPE_TAG: "steer",
            "steer_mode": "latent",
            "selection": selection,
            "registered_model": key[0],
            "model_version": str(key[1]),
            "judge": judge,
            **(tags or {}),
        },
    ).info.run_id
    for name, value in steer_params(selection, judge, n_concepts).items():
        client.log_param(run_id, name, value)
    for name, value in metrics.items():
        client.log_metric(run_id, name, value)
    client.set_terminated(run_id)
    return run_id


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
        tags={
            RUN_TYPE_TAG: "eval",
            "eval": "autointerp",
            "registered_model": name,
            "model_version": lonely.version,
        },
    )
    study_store.log_param(run.info.run_id, "n_latents", "20")
    study_store.log_param(run.info.run_id, "judge", "offline")
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
    for version_key in (key, other_key):  # a newer none run, both versions
        _steer_run(study_store, experiment, version_key, "none", {"steering_score": 0.9})
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


# ---------------------------------------------------------------------------------------------
# which runs: a study's own, never a mixture


SMALL = SyntheticStudy(architectures=("relu", "topk", "gated"), target_l0s=(16, 64), seed=3)


def _use_store(db: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """Point MLflow (tracking, registry, experiment) at the SQLite store ``db``."""
    uri = f"sqlite:///{db}"
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient()
    found = client.get_experiment_by_name("tests")
    experiment_id = (
        found.experiment_id
        if found
        else client.create_experiment("tests", (db.parent / f"{db.stem}-art").as_uri())
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    return client


def _analysis(client: MlflowClient, config: AnalyzeConfig) -> tuple[dict, list[tuple]]:
    """The analyze run's metrics and the (model URI, µ, g, gain) of its table."""
    result = analyze(config)
    table = result.report.table
    rows = sorted(zip(table["model_uri"], table["mu"], table["g"], table["gain"], strict=True))
    return client.get_run(result.run_id).data.metrics, rows


def _analyze_runs(client: MlflowClient) -> int:
    return len(
        client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`{RUN_TYPE_TAG}` = 'analyze'",
        )
    )


def test_each_study_reads_exactly_its_own_runs(
    tracking_uri: str,
    _mlflow_template_db: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    studies = {"layer 4": replace(SMALL, layer=4), "layer 10": replace(SMALL, layer=10, seed=5)}
    config = AnalyzeConfig(selection="dtc", n_resamples=200)
    # What each study alone gives: its own store, nothing else in it.
    alone = {}
    for label, study in studies.items():
        db = tmp_path / f"alone-{study.layer}.db"
        shutil.copyfile(_mlflow_template_db, db)
        client = _use_store(db, monkeypatch)
        write_study(client, "study", study)
        alone[label] = _analysis(client, config)

    # One store: both studies, then stray steer runs on some of the first study's versions,
    # newer than the study's own: another judge, and another steer config.
    client = _use_store(Path(tracking_uri.removeprefix("sqlite:///")), monkeypatch)
    study_runs = {label: write_study_run(client, "study", s) for label, s in studies.items()}
    experiment = client.get_experiment_by_name("study").experiment_id
    name = "sae-lm-a-l4-resid-post"
    for version in ("1", "2", "3"):
        _steer_run(client, experiment, (name, version), "none", {"steering_score": 0.99},
                   judge="openai")  # fmt: skip
        _steer_run(client, experiment, (name, version), "dtc", {"steering_score": 0.01},
                   judge="openai")  # fmt: skip
    _steer_run(client, experiment, (name, "4"), "dtc", {"steering_score": 0.5}, n_concepts=100)

    for label, run_id in study_runs.items():
        metrics, rows = _analysis(client, replace(config, study_run_id=run_id))
        assert metrics == alone[label][0], label
        assert rows == alone[label][1], label

    # Stand-alone over the mixture: refused, naming the groups and how to pick, nothing logged.
    before = _analyze_runs(client)
    with pytest.raises(MixedRunsError, match="3 config groups") as refused:
        analyze(config)
    message = str(refused.value)
    assert "judge=offline" in message and "judge=openai" in message
    assert "n_concepts=100" in message and "steer_group=" in message and "study_run_id" in message
    assert _analyze_runs(client) == before
    # Picking the studies' group pools both studies, every Ψ group inside one layer.
    (key,) = [
        key
        for key, identity in refused.value.groups.items()
        if identity["judge"] == "offline" and identity["n_concepts"] == "4"
    ]
    result = analyze(replace(config, steer_group=key))
    assert len(result.report.table) == 2 * len(alone["layer 4"][1])
    assert {g.group.split(", ")[1] for g in result.report.groups} == {"layer=4", "layer=10"}
    assert client.get_run(result.run_id).data.tags["steer_group"] == key
    with pytest.raises(MixedRunsError, match="steer_group='nope' matches none"):
        analyze(replace(config, steer_group="nope"))


def test_runs_about_a_recreated_model_are_left_out_and_listed(study_store: MlflowClient) -> None:
    """A registered model deleted and recreated reuses version numbers: the old runs of
    version 1 were about another SAE and must not be paired with the new one."""
    name = "sae-lm-a-l4-resid-post"
    old_runs = study_store.search_runs(
        [study_store.get_experiment_by_name("study").experiment_id],
        f"tags.registered_model = '{name}' AND tags.model_version = '1'",
    )
    assert old_runs
    study_store.delete_registered_model(name)
    study_store.create_registered_model(name)
    retrained = study_store.create_run(study_store.get_experiment_by_name("study").experiment_id)
    study_store.create_model_version(
        name,
        source=f"runs:/{retrained.info.run_id}/sae",
        run_id=retrained.info.run_id,
        tags={"lm_name": "lm-a", "architecture": "relu", "target_l0": "16",
              "training_run_id": retrained.info.run_id},
    )  # fmt: skip
    data = collect(study_store, selection="dtc")
    assert f"models:/{name}/1" not in set(data.table["model_uri"])
    about_another = [why for uri, why in data.missing if uri == f"models:/{name}/1"]
    assert any("was about another SAE" in why for why in about_another)
    assert {r.info.run_id for r in old_runs} <= {
        why.split()[2] for why in about_another if "was about another SAE" in why
    }


def test_a_zero_baseline_is_listed_not_only_counted(study_store: MlflowClient) -> None:
    experiment = study_store.get_experiment_by_name("study").experiment_id
    key = ("sae-lm-a-l4-resid-post", "1")
    _steer_run(study_store, experiment, key, "none", {"steering_score": 0.0})
    data = collect(study_store, selection="dtc")
    assert (
        f"models:/{key[0]}/{key[1]}",
        "no steering gain of dtc: its selection=none steering_score is 0",
    ) in data.missing
    result = analyze(AnalyzeConfig(selection="dtc", n_resamples=200))
    listed = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="missing.csv")
    assert "its selection=none steering_score is 0" in Path(listed).read_text()


def test_interval_and_p_value_methods_and_group_counts_are_logged(
    study_store: MlflowClient,
) -> None:
    from analysis.stats import axis_group_counts, p_value_method

    result = analyze(AnalyzeConfig(selection="dtc", n_resamples=200))
    run = study_store.get_run(result.run_id)
    table = result.report.table
    interval = bca_interval(table["mu"], table["g"], n_resamples=200, seed=0)
    assert run.data.tags["tau_b_ci_method"] == interval.method
    assert run.data.tags["tau_b_p_method"] == p_value_method(len(table), 200)
    assert run.data.tags["tau_b_p_method"] == "random_permutations"  # 20! orders > 200 draws
    assert run.data.tags["gain_tau_b_ci_method"] in {"BCa", "percentile"}
    assert run.data.metrics["tau_b_ci_undefined_draws"] == interval.undefined_draws
    for axis, (used, dropped) in axis_group_counts(table, "mu", "g").items():
        assert run.data.metrics[f"psi_{axis}_groups_used"] == used
        assert run.data.metrics[f"psi_{axis}_groups_dropped"] == dropped
    # Ψ_A: (LM, layer, width, architecture) = 2 x 5 groups of the two sparsities.
    assert run.data.metrics["psi_A_groups_used"] + run.data.metrics["psi_A_groups_dropped"] == 10


def test_the_lift_score_is_reported_beside_the_steering_score(tracking_uri: str) -> None:
    configure_tracking(tracking_uri)
    client = MlflowClient()
    write_study(client, "study", replace(SMALL, log_lift=True))
    result = analyze(AnalyzeConfig(selection="dtc", n_resamples=200))
    metrics = client.get_run(result.run_id).data.metrics
    table = result.report.table
    lift_tau = stats.kendalltau(table["mu"], table["steering_score_lift"], variant="b")
    assert metrics["lift_tau_b"] == pytest.approx(lift_tau.statistic)
    assert metrics["tau_b"] == pytest.approx(
        stats.kendalltau(table["mu"], table["g"], variant="b").statistic
    )
    assert metrics["lift_tau_b"] != pytest.approx(metrics["tau_b"])
    assert {"lift_psi", "lift_gain_tau_b", "lift_tau_b_ci_low"} <= set(metrics)
    assert [row["g"] for row in result.report.side_by_side] == [
        "steering_score", "steering_score_lift"
    ]  # fmt: skip
    page = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="report.html")
    assert "τ_b per steering score" in Path(page).read_text()
    # Per SAE, beside g and g by lift: the share of its targets steered toward a concept the
    # unsteered answers already carried (read from its own steer run).
    for row in table.itertuples():
        logged = client.get_run(row.steer_run_id).data.metrics["free_concept_share"]
        assert row.free_concept_share == logged
    assert table["free_concept_share"].nunique() > 1
    assert "<th>free_concept_share</th>" in Path(page).read_text()

    # Correlating the lift score instead: the gain by lift is over none_steering_score_lift
    # where the selection run logged it, and the AxBench score is the companion.
    experiment = client.get_experiment_by_name("study").experiment_id
    key = ("sae-lm-a-l4-resid-post", "1")
    dtc_run = client.search_runs(
        [experiment], f"tags.model_version = '1' AND tags.selection = 'dtc' "
        f"AND tags.registered_model = '{key[0]}'"
    )[0]  # fmt: skip
    client.log_metric(dtc_run.info.run_id, "none_steering_score_lift", 0.5)
    data = collect(client, utility_metric="steering_score_lift", selection="dtc",
                   companion_metric="steering_score")  # fmt: skip
    row = data.table[data.table["model_uri"] == f"models:/{key[0]}/1"].iloc[0]
    assert row["g_none"] == 0.5 and row["gain"] == pytest.approx((row["g"] - 0.5) / 0.5 * 100)
    by_lift = analyze(
        AnalyzeConfig(utility_metric="steering_score_lift", selection="dtc", n_resamples=200)
    )
    lift_metrics = client.get_run(by_lift.run_id).data.metrics
    assert lift_metrics["tau_b"] == pytest.approx(metrics["lift_tau_b"])
    assert lift_metrics["score_tau_b"] == pytest.approx(metrics["tau_b"])


def test_a_study_run_id_must_name_a_study_run(study_store: MlflowClient) -> None:
    with pytest.raises(BadInputError, match="'nope' is not a run"):
        analyze(AnalyzeConfig(study_run_id="nope"))
    some_run = study_store.search_runs(
        [study_store.get_experiment_by_name("study").experiment_id], max_results=1
    )[0]
    with pytest.raises(BadInputError, match="not a 'study' run"):
        analyze(AnalyzeConfig(study_run_id=some_run.info.run_id))
    with pytest.raises(ValueError, match="give one"):
        AnalyzeConfig(study_run_id="x", experiments="study").validate()
    assert _analyze_runs(study_store) == 0


def test_the_interval_and_p_value_do_not_depend_on_the_stores_row_order() -> None:
    """The same SAEs listed in another order (another store numbers its versions otherwise)
    give the same τ_b, interval, p-value and Ψ's: the draws see one canonical order."""
    gen = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "lm_name": "lm",
            "layer": "10",
            "d_sae": "2304",
            "architecture": [a for a in ("relu", "topk", "gated", "jumprelu") for _ in (0, 1)],
            "target_l0": ["16", "64"] * 4,
            "sparsity_rank": [0, 1] * 4,
            "mu": gen.random(8),
            "score": gen.random(8),
        }
    )
    config = AnalyzeConfig(n_resamples=200)
    first = correlation(table, "mu", "score", config, [])
    shuffled = correlation(table.sample(frac=1, random_state=1), "mu", "score", config, [])
    assert shuffled.headline == first.headline
    assert shuffled.psi == first.psi
