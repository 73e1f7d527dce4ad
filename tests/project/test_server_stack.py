"""scripts/server.sh brings up the shared stack (PostgreSQL, SeaweedFS S3, mlflow server), and
a training run against it lands where a group expects it (issue 21, item 1): runs and versions
in PostgreSQL, weights in the bucket, loadable through the server, no credential logged."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import pytest
import torch
from conftest import _free_ports
from mlflow.tracking import MlflowClient

from project.registry import load_sae
from training.config import TrainConfig
from training.train import train

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "server.sh"
SECRETS = {
    "SAEFLOW_PG_PASSWORD": "pg-s3cret-'quoted'",
    "AWS_ACCESS_KEY_ID": "saeflowtestkey",
    "AWS_SECRET_ACCESS_KEY": "saeflow-s3-s3cret",
    "MLFLOW_TRACKING_USERNAME": "admin",
    "MLFLOW_TRACKING_PASSWORD": "admin-s3cret-pw",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-s3cret",
}


def _stack_env(directory: Path, **overrides: str) -> dict[str, str]:
    pg, s3, server = _free_ports(3)
    return {
        **os.environ,
        **SECRETS,
        "SAEFLOW_AUTH": "1",
        "SAEFLOW_STACK_DIR": str(directory),
        "SAEFLOW_PG_PORT": str(pg),
        "SAEFLOW_S3_PORT": str(s3),
        "SAEFLOW_MLFLOW_PORT": str(server),
        **overrides,
    }


def _reachable_by_postgres(directory: Path) -> None:
    os.chmod(directory, 0o755)  # the postgres user must reach its data directory
    for parent in directory.parents:
        if parent == Path("/"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o011)  # traverse only


def _pg_available() -> bool:
    return bool(shutil.which("initdb")) or Path("/usr/lib/postgresql/15/bin/initdb").exists()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if not _pg_available():
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql-15 (.ci/run does)")
    directory = tmp_path_factory.mktemp("stack")
    _reachable_by_postgres(directory)
    env = _stack_env(directory)
    try:
        started = subprocess.run(
            [str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300
        )
        assert started.returncode == 0, started.stderr + started.stdout
        yield {
            "dir": str(directory),
            "tracking": f"http://127.0.0.1:{env['SAEFLOW_MLFLOW_PORT']}",
            "s3": env["SAEFLOW_S3_PORT"],
            "pg": env["SAEFLOW_PG_PORT"],
        }
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def test_start_refuses_to_run_without_credentials_in_the_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    env["SAEFLOW_STACK_DIR"] = str(tmp_path)
    done = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True)
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
        [str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2
    assert "mlflow exited while starting" in done.stderr
    status = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, text=True)
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
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{stack['s3']}",
        aws_access_key_id=SECRETS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=SECRETS["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
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
