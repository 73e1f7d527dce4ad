"""scripts/server.sh brings up the shared stack (PostgreSQL, SeaweedFS S3, mlflow server), and
a training run against it lands where a group expects it (issue 21, item 1): runs and versions
in PostgreSQL, weights in the bucket, loadable through the server, no credential logged."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import mlflow
import pytest
import torch
from conftest import (
    SECRETS,
    STACK_SCRIPT,
    _reachable_by_postgres,
    _stack_env,
    stack_s3,
    stack_script_env,
)
from mlflow.tracking import MlflowClient

from project.registry import load_sae
from training.config import TrainConfig
from training.run import ArtifactStoreError
from training.train import train


def test_start_refuses_to_run_without_credentials_in_the_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    env["SAEFLOW_STACK_DIR"] = str(tmp_path)
    done = subprocess.run([str(STACK_SCRIPT), "start"], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "SAEFLOW_PG_PASSWORD is not set: credentials come from the environment only" in (
        done.stderr
    )
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_a_start_that_fails_half_way_leaves_nothing_running(tmp_path: Path) -> None:
    """The tracking server refuses the admin password (MLflow wants >= 12 characters) after
    PostgreSQL and S3 are up: start exits 2 naming what failed, and stops the other two."""
    _reachable_by_postgres(tmp_path)
    env = _stack_env(tmp_path, MLFLOW_TRACKING_PASSWORD="short")
    done = subprocess.run(
        [str(STACK_SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2
    assert "mlflow exited while starting" in done.stderr
    status = subprocess.run([str(STACK_SCRIPT), "status"], env=env, capture_output=True, text=True)
    assert status.stdout.split("\n")[:3] == ["mlflow: down", "postgres: down", "s3: down"]


def test_anonymous_requests_are_refused_and_write_nothing(stack: dict[str, str]) -> None:
    search = f"{stack['tracking']}/api/2.0/mlflow/experiments/search?max_results=5"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(search, timeout=10)
    assert refused.value.code == 401
    create = urllib.request.Request(
        f"{stack['tracking']}/api/2.0/mlflow/experiments/create",
        data=json.dumps({"name": "anonymous-write"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(create, timeout=10)
    assert refused.value.code == 401
    token = base64.b64encode(b"admin:" + SECRETS["MLFLOW_TRACKING_PASSWORD"].encode()).decode()
    authorised = urllib.request.Request(search, headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(authorised, timeout=10) as response:
        names = [e["name"] for e in json.load(response).get("experiments", [])]
    assert "anonymous-write" not in names


def test_training_against_the_stack(
    stack: dict[str, str], tiny_lm_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with urllib.request.urlopen(f"{stack['tracking']}/health", timeout=10) as response:
        assert response.status == 200
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack["tracking"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", stack["tracking"])
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    # The client holds no S3 or database credentials (the server proxies every artifact),
    # only its tracking login.
    for name in ("SAEFLOW_PG_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, SECRETS[name])
    mlflow.set_tracking_uri(stack["tracking"])
    mlflow.set_registry_uri(stack["tracking"])
    mlflow.set_experiment("stack-test")
    try:
        config = TrainConfig(
            model=tiny_lm_dir, layer=1, n_tokens=2000, context_size=32, architecture="topk",
            target_l0=8, expansion=4, batch_size=256, training_tokens=256 * 20,
            cache_dir=str(tmp_path / "acts"), checkpoint_dir=str(tmp_path / "ckpt"),
        )  # fmt: skip
        result = train(config)
        client = MlflowClient()
        version = result.model_version
        assert client.get_model_version(version.name, version.version).status == "READY"
        # Weights went to the bucket (through the server), and load back through it.
        loaded = load_sae(f"models:/{version.name}/{version.version}")
        x = torch.randn(5, loaded.cfg.d_in)
        with torch.no_grad():
            assert torch.equal(loaded.encode(x), result.sae.eval().encode(x))
        run = client.get_run(result.run_id)
        logged = json.dumps([run.data.params, run.data.tags, version.tags])
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    s3 = stack_s3(stack)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="saeflow-artifacts").get("Contents", [])]
    assert any(k.endswith(".safetensors") for k in keys), keys[:20]
    # The S3 store refuses a client without the identity's keys.
    stranger = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{stack['s3']}",
        aws_access_key_id="nobody",
        aws_secret_access_key="nothing",
        region_name="us-east-1",
    )
    with pytest.raises(Exception, match="(?i)access|denied|invalid|forbidden|signature"):
        stranger.list_objects_v2(Bucket="saeflow-artifacts")
    # Runs and versions live in PostgreSQL's mlflow database.
    psql = subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            stack["pg"],
            "-U",
            "saeflow",
            "-d",
            "mlflow",
            "-tAc",
            f"SELECT count(*) FROM runs WHERE run_uuid = '{result.run_id}'",
        ],  # fmt: skip
        env={**os.environ, "PGPASSWORD": SECRETS["SAEFLOW_PG_PASSWORD"]},
        capture_output=True,
        text=True,
    )
    assert psql.stdout.strip() == "1", psql.stderr
    # No secret in what the run logged (the user name is the run's `mlflow.user`, as it should).
    for name, secret in SECRETS.items():
        if name != "MLFLOW_TRACKING_USERNAME":
            assert secret not in logged, name


def test_a_user_without_edit_permission_cannot_register_a_version(
    stack: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Basic-auth's default permission is READ: a second user reads the admin's registered
    model but cannot add a version to it, and nothing lands."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, SECRETS[name])
    model = f"guarded-{os.getpid()}"
    admin = MlflowClient(stack["tracking"], registry_uri=stack["tracking"])
    admin.create_registered_model(model)
    get_app_client("basic-auth", tracking_uri=stack["tracking"]).create_user(
        "reader", "reader-password-1"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "reader-password-1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    reader = MlflowClient(stack["tracking"], registry_uri=stack["tracking"])
    assert reader.get_registered_model(model).name == model  # READ is allowed
    with pytest.raises(MlflowException, match="(?i)permission"):
        reader.create_model_version(model, source="s3://saeflow-artifacts/nothing")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, SECRETS[name])
    assert admin.search_model_versions(f"name = '{model}'") == []


def test_with_the_s3_store_down_training_fails_clearly_and_registers_nothing(
    stack: dict[str, str], tiny_lm_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, SECRETS[name])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # fail in seconds, not minutes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack["tracking"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", stack["tracking"])
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(stack["tracking"])
    mlflow.set_registry_uri(stack["tracking"])
    experiment = mlflow.set_experiment(f"s3-down-{os.getpid()}").experiment_id
    model = f"s3-down-{os.getpid()}"
    pid = int(Path(stack["dir"], "s3.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    try:
        config = TrainConfig(
            model=tiny_lm_dir, layer=1, n_tokens=2000, context_size=32, architecture="topk",
            target_l0=8, expansion=4, batch_size=256, training_tokens=256 * 20,
            cache_dir=str(tmp_path / "acts"), checkpoint_dir=str(tmp_path / "ckpt"),
            registered_model=model,
        )  # fmt: skip
        with pytest.raises(ArtifactStoreError, match="is the artifact store reachable"):
            train(config)
        client = MlflowClient()
        (run,) = client.search_runs([experiment], "tags.`saeflow.run_type` = 'train'")
        assert run.info.status == "FAILED"
        assert client.search_model_versions(f"name = '{model}'") == []
    finally:
        restarted = subprocess.run(
            [str(STACK_SCRIPT), "restart", "s3"],
            env=stack_script_env(stack),
            capture_output=True,
            text=True,
            timeout=300,
        )
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert restarted.returncode == 0, restarted.stderr
