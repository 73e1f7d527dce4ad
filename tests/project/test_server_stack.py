"""scripts/server.sh brings up the shared stack (PostgreSQL, SeaweedFS S3, mlflow server), and
a training run against it lands where a group expects it (issue 21, item 1): runs and versions
in PostgreSQL, weights in the bucket, loadable through the server, no credential logged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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
}


def _pg_available() -> bool:
    return bool(shutil.which("initdb")) or Path("/usr/lib/postgresql/15/bin/initdb").exists()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if not _pg_available():
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql-15 (.ci/run does)")
    directory = tmp_path_factory.mktemp("stack")
    os.chmod(directory, 0o755)  # the postgres user must reach its data directory
    for parent in directory.parents:
        if parent == Path("/"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o011)  # traverse only
    pg, s3, server = _free_ports(3)
    env = {
        **os.environ,
        **SECRETS,
        "SAEFLOW_STACK_DIR": str(directory),
        "SAEFLOW_PG_PORT": str(pg),
        "SAEFLOW_S3_PORT": str(s3),
        "SAEFLOW_MLFLOW_PORT": str(server),
    }
    started = subprocess.run(
        [str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300
    )
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        yield {"dir": str(directory), "tracking": f"http://127.0.0.1:{server}", "s3": str(s3),
               "pg": str(pg)}  # fmt: skip
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


def test_training_against_the_stack(
    stack: dict[str, str], tiny_lm_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with urllib.request.urlopen(f"{stack['tracking']}/health", timeout=10) as response:
        assert response.status == 200
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack["tracking"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", stack["tracking"])
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    # The client holds no S3 credentials: the server proxies every artifact.
    for name in SECRETS:
        monkeypatch.delenv(name, raising=False)
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
    # No credential in what the run logged.
    for secret in SECRETS.values():
        assert secret not in logged
