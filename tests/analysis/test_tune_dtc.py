"""tune_dtc (analysis/tune_dtc.py): an Optuna study over DTC selection on a tiny random LM
with a registered TopK SAE — nested trial runs and the test comparison on the parent run, two
worker processes on one SQLite storage, resume after an interruption, bad input."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from conftest import register_as_trained
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from analysis.tune_dtc import (
    INFEASIBLE,
    PARENT_ATTR,
    TRIAL_RUN_TYPE,
    TUNE_RUN_TYPE,
    VERSION_LINK_TAG,
    TuneConfig,
    _fail_orphans,
    open_storage,
    resolve_storage,
    tune,
)
from project.saes import SAEConfig, build_sae
from project.tracking import RUN_TYPE_TAG

NAME = "sae-tiny-tune"
LAYER = 1
REPO = Path(__file__).resolve().parents[2]
# A small space (2 variants x 3 directions x (K 1, 2 + q 0.9) = 18 sets) and a cheap trial.
SMALL = {
    "alphas": (10.0,),
    "dtc_ks": (1,),
    "top_ks": (1, 2),
    "quantiles": (0.9,),
    "n_concepts": 1,
    "n_instructions": 2,
    "factors": (1.0, 4.0),
    "max_new_tokens": 3,
    "stats_n_tokens": 512,
    "explain_n_tokens": 2048,
    "heartbeat_seconds": 1,
    "grace_seconds": 3,
    "poll_seconds": 0.5,
}
CLI_SMALL = [
    "--alphas=10",
    "--dtc_ks=1",
    "--top_ks=1,2",
    "--quantiles=0.9",
    "--n_concepts=1",
    "--n_instructions=2",
    "--factors=1,4",
    "--max_new_tokens=3",
    "--stats_n_tokens=512",
    "--explain_n_tokens=2048",
]


def register_tiny_sae(tiny_lm_dir: str) -> str:
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=48, k=8))
    version = register_as_trained(
        sae, registered_model=NAME, lm_name=tiny_lm_dir, layer=LAYER, target_l0=8
    )
    return f"models:/{NAME}/{version.version}"


def runs_of(run_type: str) -> list:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`{RUN_TYPE_TAG}` = '{run_type}'")


def the_study(storage_url: str) -> optuna.Study:
    (summary,) = optuna.get_all_study_summaries(storage_url)
    return optuna.load_study(study_name=summary.study_name, storage=storage_url)


def assert_distinct_complete(study: optuna.Study, n: int) -> list:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len(complete) == n
    param_sets = [json.dumps(t.params, sort_keys=True) for t in complete]
    assert len(set(param_sets)) == n, param_sets
    return complete


def complete_trials_in(path: str) -> int:
    """COMPLETE trials in an Optuna SQLite file, read with sqlite3 alone (opening it through
    Optuna while a worker creates its schema would race that worker)."""
    if not Path(path).exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
            return db.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # no schema yet
        return 0


def worker_command(uri: str, storage: str, n_trials: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "analysis.tune_dtc",
        "--model_uri",
        uri,
        "--storage",
        storage,
        "--n_trials",
        str(n_trials),
        *CLI_SMALL,
    ]


def worker_env() -> dict[str, str]:
    # One thread per worker: the two share this machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"directions": ("up", "sideways")}, "unknown direction 'sideways'"),
        ({"quantiles": (0.9, 1.0)}, r"quantile q=1.0 must lie strictly inside \(0, 1\)"),
        ({"quantiles": (0.0,)}, r"quantile q=0.0 must lie strictly inside \(0, 1\)"),
        ({"n_trials": 0}, "n_trials=0 must be an integer >= 1"),
        ({"rules": ("threshold",)}, "unknown rule 'threshold'; the tuned rules are"),
        ({"variants": ("alone",)}, "unknown DTC variant 'alone'"),
        ({"alphas": (-1.0,)}, "alpha=-1.0 must be >= 0"),
        ({"n_trials": 19}, "n_trials=19 exceeds the 18 distinct parameter sets"),
    ],
)
def test_bad_config(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TuneConfig(**{**SMALL, **changes})


def test_storage_urls(tmp_path: Path) -> None:
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_storage("auto", tracking) == f"sqlite:///{tmp_path}/mlflow.optuna.db"
    other = f"sqlite:///{tmp_path}/other.db"  # a second store in the same folder: its own file
    assert resolve_storage("auto", other) == f"sqlite:///{tmp_path}/other.optuna.db"
    assert resolve_storage(str(tmp_path / "s.db"), tracking) == f"sqlite:///{tmp_path}/s.db"
    url = "postgresql+psycopg2://u:p@db/optuna"
    assert resolve_storage(url, tracking) == url
    for bad in ("redis://localhost:6379", "file:///tmp/x", "http://server:5000"):
        with pytest.raises(ValueError, match="unsupported URL scheme"):
            resolve_storage(bad, tracking)


def test_bad_storage_fails_before_any_run(tiny_lm_dir: str, tracking_uri: str) -> None:
    uri = register_tiny_sae(tiny_lm_dir)
    before = {r.info.run_id for r in runs_of("train")}
    with pytest.raises(ValueError, match="unsupported URL scheme 'redis'"):
        tune(uri, TuneConfig(**{**SMALL, "n_trials": 2}), "redis://localhost/0")
    with pytest.raises(ValueError, match="names 0 versions|does not resolve"):
        tune("models:/no-such-model/1", TuneConfig(**{**SMALL, "n_trials": 2}), "auto")
    client = MlflowClient()
    all_runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.run_id for r in all_runs} == before  # nothing but the registering run


def test_command_line_bad_input_exits_2(
    tiny_lm_dir: str, tracking_uri: str, tmp_path: Path
) -> None:
    uri = register_tiny_sae(tiny_lm_dir)
    storage = tmp_path / "optuna.db"
    done = subprocess.run(
        [*worker_command(uri, str(storage), 2), "--directions", "up,diagonal"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=worker_env(),
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "unknown direction 'diagonal'; valid directions: up, down, abs" in done.stderr
    assert not storage.exists()


# ---------------------------------------------------------------------------------------------
# one worker: nested runs, the test comparison, resume


def test_study_logs_trials_and_compares_with_output_score(
    tiny_lm_dir: str, tracking_uri: str, tmp_path: Path
) -> None:
    uri = register_tiny_sae(tiny_lm_dir)
    storage = str(tmp_path / "study.db")
    result = tune(uri, TuneConfig(**{**SMALL, "n_trials": 3}), storage)
    url = f"sqlite:///{storage}"
    study = the_study(url)
    complete = assert_distinct_complete(study, 3)
    assert study.user_attrs[PARENT_ATTR] == result.parent_run_id

    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags[RUN_TYPE_TAG] == TUNE_RUN_TYPE
    assert parent.data.tags["model_uri"] == uri
    assert parent.data.tags["registered_model"] == NAME
    assert parent.data.tags["training_run_id"]
    name, version = uri.removeprefix("models:/").split("/")
    assert client.get_model_version(name, version).tags[VERSION_LINK_TAG] == parent.info.run_id

    trials = runs_of(TRIAL_RUN_TYPE)
    assert len(trials) == 3
    by_number = {int(r.data.tags["optuna_trial_number"]): r for r in trials}
    for t in complete:
        run = by_number[t.number]
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert run.info.status == "FINISHED"
        # The objective is the steering score by concept lift; the paper's score is logged too.
        assert run.data.metrics["dev_score_lift"] == pytest.approx(t.value)
        assert run.data.metrics["dev_score"] >= run.data.metrics["dev_score_lift"]
        assert run.data.params["direction"] == t.params["direction"]
        assert run.data.params["variant"] == t.params["variant"]
    best = max(complete, key=lambda t: t.value)
    m = parent.data.metrics
    assert m["best_dev_score"] == pytest.approx(best.value)
    assert parent.data.tags["best_trial_number"] == str(study.best_trial.number)
    assert 0.0 <= m["test_steering_score_dtc"] <= 2.0
    assert 0.0 <= m["test_steering_score_output_score"] <= 2.0
    assert m["test_score_difference"] == pytest.approx(
        m["test_steering_score_dtc"] - m["test_steering_score_output_score"]
    )
    for name in ("dtc", "output_score", "none"):  # compared at one size, by both scores
        assert m[f"n_steered_{name}"] >= 1
        assert 0.0 <= m[f"test_steering_score_lift_{name}"] <= 2.0
    assert m["test_score_lift_difference_none"] == pytest.approx(
        m["test_steering_score_lift_dtc"] - m["test_steering_score_lift_none"]
    )
    assert m["subset_size"] >= 1 and m["n_complete_trials"] == 3
    targets = mlflow.load_table("tables/test_targets.json", run_ids=[parent.info.run_id]).to_dict(
        "records"
    )
    assert {r["selection"] for r in targets} == {"dtc", "output_score", "none"}
    # The DTC table was computed once for the one (alpha, k) and reused by every trial.
    assert len(runs_of("eval")) == 1

    # A second run with a larger total resumes the same study and adds only the missing trials.
    again = tune(uri, TuneConfig(**{**SMALL, "n_trials": 5}), storage)
    assert again.study_name == result.study_name and again.parent_run_id == result.parent_run_id
    resumed = assert_distinct_complete(the_study(url), 5)
    old = {t.number: t.params for t in complete}
    assert {t.number: t.params for t in resumed if t.number in old} == old
    assert len(runs_of(TRIAL_RUN_TYPE)) == 5


def test_two_workers_complete_exactly_n_distinct_trials(
    tiny_lm_dir: str, tracking_uri: str, tmp_path: Path
) -> None:
    uri = register_tiny_sae(tiny_lm_dir)
    storage = str(tmp_path / "shared.db")
    n = 4
    workers = [
        subprocess.Popen(
            worker_command(uri, storage, n),
            cwd=REPO,
            env=worker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    for w, out in zip(workers, outputs, strict=True):
        assert w.returncode == 0, out[-3000:]
    study = the_study(f"sqlite:///{storage}")
    complete = assert_distinct_complete(study, n)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    # One parent run for the study; every completed trial is one nested run under it.
    parents = runs_of(TUNE_RUN_TYPE)
    assert [p.info.run_id for p in parents] == [study.user_attrs[PARENT_ATTR]]
    finished = [r for r in runs_of(TRIAL_RUN_TYPE) if r.info.status == "FINISHED"]
    assert sorted(int(r.data.tags["optuna_trial_number"]) for r in finished) == sorted(
        t.number for t in complete
    )
    assert {r.data.tags["mlflow.parentRunId"] for r in finished} == {parents[0].info.run_id}
    assert "test_score_difference" in parents[0].data.metrics
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert all(t.user_attrs.get("outcome") in ("duplicate", "surplus", INFEASIBLE) for t in pruned)


def test_a_trial_never_claimed_is_failed_after_the_grace_period(tmp_path: Path) -> None:
    # A worker stopped between Optuna creating its trial and the first heartbeat leaves a
    # RUNNING trial with no heartbeat: Optuna's stale check never fails it (seen in CI).
    config = TuneConfig(**{**SMALL, "n_trials": 2})
    storage = open_storage(f"sqlite:///{tmp_path / 'orphans.db'}", config)
    study = optuna.create_study(study_name="orphans", storage=storage)
    orphan, claimed, young = study.ask(), study.ask(), None
    claimed.set_user_attr("claimed", True)
    time.sleep(1.2)
    young = study.ask()
    _fail_orphans(study, grace_seconds=1)
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {
        orphan.number: TrialState.FAIL,
        claimed.number: TrialState.RUNNING,  # its worker's heartbeat decides, not its age
        young.number: TrialState.RUNNING,  # may be about to claim
    }


def test_resume_after_interruption_adds_only_missing_trials(
    tiny_lm_dir: str, tracking_uri: str, tmp_path: Path
) -> None:
    uri = register_tiny_sae(tiny_lm_dir)
    storage = str(tmp_path / "interrupted.db")
    url = f"sqlite:///{storage}"
    n = 4
    worker = subprocess.Popen(
        worker_command(uri, storage, n),
        cwd=REPO,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 180
    done_before = 0
    while done_before < 2:  # Ctrl-C once two trials are complete
        assert worker.poll() is None, worker.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the worker did not complete two trials in time"
        time.sleep(0.2)
        done_before = complete_trials_in(storage)
    worker.send_signal(signal.SIGINT)
    try:
        worker.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        # Seen once in a full suite (stop 32; not reproduced alone): the worker outlived its
        # Ctrl-C by a minute. A kill is the harder interruption; resuming must cope with it too.
        worker.kill()
        worker.communicate()
    before = {t.number: t.params for t in the_study(url).get_trials(states=(TrialState.COMPLETE,))}
    # Later trials reuse cached latents and can finish within one poll: a worker Ctrl-C stopped
    # exits non-zero; one that had already finished exits 0 with all n.
    # Either way the resumed study must end with exactly n distinct trials, the old ones kept.
    assert 2 <= len(before) <= n
    assert worker.returncode != 0 or len(before) == n

    time.sleep(SMALL["grace_seconds"] + 1)  # a trial left RUNNING goes stale
    tune(uri, TuneConfig(**{**SMALL, "n_trials": n}), storage)
    study = the_study(url)
    after = assert_distinct_complete(study, n)
    # The trial Ctrl-C stopped FAILED (or went stale and was failed by the heartbeat).
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert {t.number: t.params for t in after if t.number in before} == before
    # Only the missing trials ran: n - len(before) new trial runs beside the old ones.
    trial_runs = runs_of(TRIAL_RUN_TYPE)
    assert sum(r.info.status == "FINISHED" for r in trial_runs) == n
