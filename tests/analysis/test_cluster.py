"""``executor=ray`` (issue 21): the study's units as tasks on a real two-node Ray cluster on
loopback (``ray start --head`` and a second ``ray start --address``, one CPU each), against the
real stack of ``scripts/server.sh`` (PostgreSQL, SeaweedFS S3, mlflow server with basic-auth).
Workers get their credentials from their own environment, as on a cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
from conftest import SECRETS, STACK_SCRIPT, _free_ports, stack_s3, stack_script_env
from mlflow.tracking import MlflowClient
from test_study import tiny_study

from analysis.cluster import RayUnits
from analysis.study import StudyConfig, run_study
from analysis.units import UNIT_TAG, WORKER_TAG, train_unit_key
from project.claims import claim
from project.lm import load_lm
from project.tracking import RUN_TYPE_TAG
from training.config import TrainConfig
from training.run import RESUMED_FROM_STEP_METRIC

RAY = Path(sys.executable).parent / "ray"


@pytest.fixture(scope="module")
def worker_env(stack: dict[str, str]) -> dict[str, str]:
    """What a worker (and the driver) holds: the tracking login, the coordination database
    and its password; no S3 keys (the tracking server proxies every artifact)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(
        MLFLOW_TRACKING_URI=stack["tracking"],
        MLFLOW_TRACKING_USERNAME=SECRETS["MLFLOW_TRACKING_USERNAME"],
        MLFLOW_TRACKING_PASSWORD=SECRETS["MLFLOW_TRACKING_PASSWORD"],
        SAEFLOW_COORDINATION_DB=stack["coordination"],
        PGPASSWORD=SECRETS["SAEFLOW_PG_PASSWORD"],
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


@pytest.fixture(scope="module")
def ray_cluster(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A head node and a second node joined to it, one CPU each; the head's address."""
    import ray

    (port,) = _free_ports(1)
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--disable-usage-stats"]
    started = []
    try:
        for extra in (
            ["--head", f"--port={port}", "--include-dashboard=false"],
            [f"--address={address}"],
        ):
            done = subprocess.run(
                [str(RAY), "start", *extra, *common],
                env=worker_env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            started.append(extra)
        ray.init(address=address, log_to_driver=True)
        deadline = time.monotonic() + 60
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert time.monotonic() < deadline, ray.nodes()
            time.sleep(0.5)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)


def _point_at_stack(worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """This process (the driver) pointed at the stack, as a user's shell would be."""
    for name in [n for n in os.environ if n.startswith(("AWS_", "MLFLOW_"))]:
        monkeypatch.delenv(name)
    for name, value in worker_env.items():
        if name.startswith(("MLFLOW_", "SAEFLOW_COORDINATION", "PGPASSWORD")):
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(worker_env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(worker_env["MLFLOW_TRACKING_URI"])


@pytest.fixture
def on_stack(worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    _point_at_stack(worker_env, monkeypatch)
    yield worker_env["MLFLOW_TRACKING_URI"]
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _val_metrics(client: MlflowClient, uris: list[str]) -> dict[tuple[str, str], dict]:
    """(architecture, target L0) → the training run's held-out metrics, per version."""
    out = {}
    for uri in uris:
        name, version = uri.removeprefix("models:/").split("/")
        mv = client.get_model_version(name, version)
        run = client.get_run(mv.tags["training_run_id"])
        key = (mv.tags["architecture"], mv.tags["target_l0"])
        out[key] = {k: v for k, v in run.data.metrics.items() if k.startswith("val_")}
    return out


def test_the_study_on_ray_gives_the_local_study_and_reuses_on_a_restart(
    stack: dict[str, str],
    ray_cluster: str,
    tiny_lm_dir: str,
    tracking_uri: str,
    tmp_path: Path,
    worker_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its own harvest size: the session's activation cache must not hand test_study a harvest.
    local_config = replace(tiny_study(tiny_lm_dir, tmp_path / "optuna.db"), n_tokens=3968)
    local = run_study(local_config)
    local_client = MlflowClient()
    local_saes = _val_metrics(local_client, local.versions)

    # The same study through the Ray executor against the stack.
    _point_at_stack(worker_env, monkeypatch)
    mlflow.set_experiment("ray-study")
    config = StudyConfig(
        **{
            **local_config.__dict__,
            "executor": "ray",
            "ray_address": ray_cluster,
            "tune_storage": "auto",
        }
    )
    first = run_study(config)
    client = MlflowClient()
    assert first.failures == []
    assert len(first.versions) == 4 and len(first.new_runs("train")) == 4
    assert {r.detail for r in first.new_runs("steer")} == {"none", "dtc"}
    assert len(first.new_runs("steer")) == 8 and len(first.new_runs("tune")) == 1
    study_run = client.get_run(first.run_id)
    # Units ran in workers of both nodes' processes, none in this one.
    workers = study_run.data.tags["saeflow.workers"].split(", ")
    assert len(workers) >= 2 and all(not w.endswith(f":{os.getpid()}") for w in workers)
    assert study_run.data.metrics["n_units_resumed"] == 0
    # Each SAE once: one train run and one version per unit, and the same SAEs as locally
    # (one thread per worker against two here: equal up to float rounding).
    ray_saes = _val_metrics(client, first.versions)
    assert ray_saes.keys() == local_saes.keys()
    for key, metrics in ray_saes.items():
        for name, value in local_saes[key].items():
            assert metrics[name] == pytest.approx(value, rel=1e-3, abs=1e-4), (key, name)
    experiment = study_run.info.experiment_id
    train_runs = client.search_runs(
        [experiment], f"tags.`{RUN_TYPE_TAG}` = 'train'", max_results=100
    )
    assert len(train_runs) == 4
    assert len({r.data.tags[UNIT_TAG] for r in train_runs}) == 4
    for run in train_runs:
        assert run.data.tags["mlflow.parentRunId"] == first.run_id
        name, version = run.data.tags["saeflow.model_version"].removeprefix("models:/").split("/")
        same_run = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
        assert len(same_run) == 1
    # The tune study lives in the coordination database, not in a local file.
    tune_run = client.get_run(first.new_runs("tune")[0].run_id)
    assert tune_run.data.tags["optuna_storage"].startswith("postgresql+psycopg://saeflow@")
    assert first.headline["tau_b"] == pytest.approx(local.headline["tau_b"], abs=1e-9)

    # Started again: every unit finds its run, nothing new but the analysis.
    second = run_study(config)
    assert second.failures == [] and sorted(second.versions) == sorted(first.versions)
    assert [r for r in second.runs if r.step != "analyze" and not r.reused] == []
    _assert_no_credential_stored(stack)


def _assert_no_credential_stored(stack: dict[str, str]) -> None:
    """No password or key anywhere in the tracking database or the artifact bucket."""
    dump = subprocess.run(
        ["pg_dump", "-h", "127.0.0.1", "-p", stack["pg"], "-U", "saeflow", "mlflow"],
        env={**os.environ, "PGPASSWORD": SECRETS["SAEFLOW_PG_PASSWORD"]},
        capture_output=True,
        check=True,
    ).stdout
    assert b"CREATE TABLE" in dump
    s3 = stack_s3(stack)
    stored = {"the mlflow database": dump}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="saeflow-artifacts"):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket="saeflow-artifacts", Key=item["Key"])["Body"].read()
            stored[item["Key"]] = item["Key"].encode() + b"\n" + body
    assert len(stored) > 20
    secrets = {k: v for k, v in SECRETS.items() if k != "MLFLOW_TRACKING_USERNAME"}
    leaks = [
        f"{name} in {where}"
        for name, secret in secrets.items()
        for where, blob in stored.items()
        if secret.encode() in blob
    ]
    assert leaks == []


def _train_config(lm_dir: str, tmp_path: Path, seed: int) -> TrainConfig:
    # n_tokens of its own: the session's activation cache must not hand test_study a harvest.
    return TrainConfig(
        model=lm_dir, layer=1, n_tokens=4032, context_size=64, architecture="topk",
        target_l0=8, expansion=2, batch_size=64, training_tokens=64 * 3000,
        checkpoint_every_n_steps=50, seed=seed, log_every_n_steps=50,
    )  # fmt: skip


def _units(client: MlflowClient, experiment: str) -> RayUnits:
    parent = client.create_run(experiment, run_name="driver").info.run_id
    return RayUnits(
        {"tracking_uri": mlflow.get_tracking_uri(), "experiment_id": experiment,
         "study_run_id": parent}
    )  # fmt: skip


def test_a_worker_killed_mid_training_is_retried_and_resumes_from_its_checkpoint(
    ray_cluster: str, on_stack: str, tiny_lm_dir: str, tmp_path: Path
) -> None:
    client = MlflowClient()
    experiment = client.create_experiment(f"ray-fault-{time.time_ns()}")
    lm_name = load_lm(tiny_lm_dir).name
    config = _train_config(tiny_lm_dir, tmp_path, seed=11)
    unit = train_unit_key(config)
    units = _units(client, experiment)
    units.submit("train", "topk", config=None, train_config=config, lm_name=lm_name)
    deadline = time.monotonic() + 240
    killed = None
    while killed is None:
        assert time.monotonic() < deadline, "no checkpoint artifact appeared"
        runs = client.search_runs([experiment], f"tags.`{UNIT_TAG}` = '{unit}'")
        if runs and WORKER_TAG in runs[0].data.tags:
            checkpoints = client.list_artifacts(runs[0].info.run_id, "checkpoints")
            if checkpoints:
                host, pid = runs[0].data.tags[WORKER_TAG].rsplit(":", 1)
                os.kill(int(pid), signal.SIGKILL)
                killed = runs[0].info.run_id
        time.sleep(0.2)
    _, _, _, outcome = units.next_done()
    assert outcome.failures == [] and outcome.resumed_run
    # One run for the unit (the killed one, resumed and FINISHED) and one version from it.
    (run,) = client.search_runs([experiment], f"tags.`{UNIT_TAG}` = '{unit}'")
    assert run.info.run_id == killed and run.info.status == "FINISHED"
    assert run.data.metrics[RESUMED_FROM_STEP_METRIC] >= 50
    assert run.data.tags[WORKER_TAG] != f"{host}:{pid}"
    name = outcome.version_uri.removeprefix("models:/").split("/")[0]
    assert len(client.search_model_versions(f"name = '{name}' and run_id = '{killed}'")) == 1


def test_two_claims_on_one_unit_train_it_once(
    ray_cluster: str, on_stack: str, tiny_lm_dir: str, tmp_path: Path
) -> None:
    """Two studies asking for the same SAE at the same moment: one trains, the other waits
    for the claim and reuses its version."""
    client = MlflowClient()
    experiment = client.create_experiment(f"ray-race-{time.time_ns()}")
    lm_name = load_lm(tiny_lm_dir).name
    config = _train_config(tiny_lm_dir, tmp_path, seed=12)
    config.training_tokens = 64 * 200
    units = _units(client, experiment)
    unit = train_unit_key(config)
    with claim(unit):  # held here while both tasks start: neither may train meanwhile
        for _ in range(2):
            units.submit("train", "topk", config=None, train_config=config, lm_name=lm_name)
        time.sleep(8)
        assert client.search_runs([experiment], f"tags.`{UNIT_TAG}` = '{unit}'") == []
    outcomes = [units.next_done()[3] for _ in range(2)]
    assert [o.failures for o in outcomes] == [[], []]
    assert outcomes[0].version_uri == outcomes[1].version_uri
    assert sorted(o.runs[0].reused for o in outcomes) == [False, True]
    assert len(client.search_runs([experiment], f"tags.`{UNIT_TAG}` = '{unit}'")) == 1


def _restart(stack: dict[str, str], component: str, **env: str) -> None:
    done = subprocess.run(
        [str(STACK_SCRIPT), "restart", component],
        env={**stack_script_env(stack), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_study_survives_the_tracking_server_and_postgres_restarting(
    stack: dict[str, str], ray_cluster: str, on_stack: str, tiny_lm_dir: str, tmp_path: Path
) -> None:
    """Mid-study the tracking server is killed and started again, then PostgreSQL stops
    immediately and starts again: the driver and the workers retry with back-off (MLflow's
    client) and the study finishes, every SAE trained and registered once."""
    experiment = mlflow.set_experiment(f"ray-restarts-{time.time_ns()}").experiment_id
    config = replace(
        tiny_study(tiny_lm_dir, tmp_path / "unused.db"),
        n_tokens=3904, executor="ray", ray_address=ray_cluster, tune_storage="auto",
    )  # fmt: skip
    client = MlflowClient()
    outcome: dict[str, object] = {}

    def study() -> None:
        try:
            outcome["result"] = run_study(config)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=study)
    thread.start()
    deadline = time.monotonic() + 300
    while not client.search_runs([experiment], f"tags.`{RUN_TYPE_TAG}` = 'train'"):
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.5)
    # The tracking server SIGKILLed (its workers too), then started again.
    assert thread.is_alive(), "the study ended before the fault"
    pid = int(Path(stack["dir"], "mlflow.pid").read_text())
    subprocess.run(["pkill", "-KILL", "-P", str(pid)], check=False)
    os.kill(pid, signal.SIGKILL)
    _restart(stack, "mlflow")
    while not client.search_runs([experiment], f"tags.`{RUN_TYPE_TAG}` = 'eval'"):
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.5)
    assert thread.is_alive(), "the study ended before the fault"
    _restart(stack, "postgres", SAEFLOW_PG_STOP_MODE="immediate")
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.failures == [] and len(result.versions) == 4
    train_runs = client.search_runs([experiment], f"tags.`{RUN_TYPE_TAG}` = 'train'")
    assert len(train_runs) == 4 and all(r.info.status == "FINISHED" for r in train_runs)
    for run in train_runs:
        name = run.data.tags["saeflow.model_version"].removeprefix("models:/").split("/")[0]
        same_run = f"name = '{name}' and run_id = '{run.info.run_id}'"
        assert len(client.search_model_versions(same_run)) == 1
