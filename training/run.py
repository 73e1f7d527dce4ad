"""Train one SAE on cached activations inside an MLflow run and register it.

The pieces the `train` and `sweep` entry points share: turning a TrainConfig into an SAE
config, fitting it with Lightning under an explicit MLflow run, scoring it on held-out
activations, and registering it. Registration is the very last step, so a failed or NaN
training leaves nothing in the registry.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import mlflow
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from project.activation_cache import HarvestRequest, HarvestResult, harvest
from project.lm import LoadedLM, hook_name
from project.registry import default_registered_model_name, register_sae
from project.saes import BatchTopKSAE, SAEConfig, SparseAutoencoder, build_sae
from project.tracking import LM_TAG, MODEL_VERSION_TAG, RUN_TYPE_TAG
from training.config import K_ARCHITECTURES, L1_ARCHITECTURES, TrainConfig
from training.data import ActivationDataModule
from training.module import SAETrainingModule, evaluate_sae

log = logging.getLogger(__name__)

CHECKPOINT_DIR_TAG = "saeflow.checkpoint_dir"
LAST_CHECKPOINT = "last.ckpt"
# Where the run keeps its newest checkpoint among its artifacts (behind the tracking server:
# S3), so that a resume on any machine continues from it.
CHECKPOINT_ARTIFACT_DIR = "checkpoints"
# Run metric: the step a resumed training continued from (0: from the start).
RESUMED_FROM_STEP_METRIC = "resumed_from_step"
TRAIN_CONFIG_ARTIFACT = "train_config.json"
# Run tag: the hash of the code a training result depends on; a version is reused for a config
# only when it was trained by this code (a trainer fix retrains).
TRAINING_CODE_TAG = "training_code_version"
TRAINING_CODE_PACKAGES = ("training", "project.saes")


def training_code_version() -> str:
    """``<package version>+src.<hash>`` of ``training/`` and ``project/saes/``."""
    # The one source hash helper, shared with the eval and steer config hashes.
    from project.runs import code_version

    return code_version(TRAINING_CODE_PACKAGES)


# Version tag: held-out L0 of the registered SAE, beside the nominal "target_l0".
L0_MEASURED_TAG = "l0_measured"


@dataclass
class TrainResult:
    """What a finished training produced."""

    run_id: str
    sae: SparseAutoencoder
    metrics: dict[str, float]
    model_version: ModelVersion


def default_cache_root() -> str:
    base = os.environ.get("SAEFLOW_CACHE_DIR", str(Path.home() / ".cache" / "saeflow"))
    return str(Path(base) / "activations")


def harvest_for(config: TrainConfig, lm: LoadedLM | None = None) -> HarvestResult:
    """Harvest (or reuse) the activations a config trains on."""
    request = HarvestRequest(
        model=config.model,
        layer=config.layer,
        corpus=config.dataset,
        text_column=config.text_column,
        n_tokens=config.n_tokens,
        context_size=config.context_size,
    )
    return harvest(request, config.cache_dir or default_cache_root(), lm=lm)


def sae_config_for(config: TrainConfig, d_in: int, model_name: str) -> SAEConfig:
    """The SAE's own config: width from the expansion, sparsity from the architecture."""
    extra: dict[str, Any] = {}
    if config.architecture in K_ARCHITECTURES:
        extra["k"] = config.target_l0
    extra["target_l0"] = float(config.target_l0)
    if config.architecture in L1_ARCHITECTURES:
        if config.l1_coefficient > 0:
            extra["l1_coefficient"] = config.l1_coefficient  # fixed λ
        else:
            extra["l1_control"] = "target_l0"  # λ adapted so that L0 reaches target_l0
    return SAEConfig(
        architecture=config.architecture,
        d_in=d_in,
        d_sae=config.expansion * d_in,
        dead_tokens_threshold=config.resolved_dead_tokens_window(),
        metadata={
            LM_TAG: model_name,
            "hook_name": hook_name(config.layer),
            "hook_layer": config.layer,
            "context_size": config.context_size,
            "dataset_path": config.dataset,
            "prepend_bos": True,
        },
        **extra,
    )


def choose_threshold(sae: BatchTopKSAE, config: TrainConfig, data: ActivationDataModule) -> None:
    """Log both inference thresholds of a BatchTopK-family SAE and keep the configured one."""
    running_mean = float(sae.threshold_value)
    calibrated = sae.calibrated_threshold(data.sample(min(16384, data.train_ND.shape[0])))
    mlflow.log_metrics({"threshold_running_mean": running_mean, "threshold_calibrated": calibrated})
    if config.batchtopk_threshold == "calibrated":
        sae.set_threshold(calibrated)
    elif running_mean <= 0:
        # Only if no step ever updated θ (a run with no positive activation at all).
        raise RuntimeError(
            f"the running-mean threshold was never set (θ = {running_mean}); "
            "train with batchtopk_threshold=calibrated"
        )
    log.info(
        "%s threshold: running mean %.4g, calibrated %.4g; using %s",
        config.architecture,
        running_mean,
        calibrated,
        config.batchtopk_threshold,
    )


def checkpoint_step(path: str | None) -> int:
    """The global step a Lightning checkpoint was saved at (0 without one); tensors only."""
    if path is None:
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state.get("global_step", 0))


class ArtifactStoreError(RuntimeError):
    """The run's config or a checkpoint could not reach its artifacts: training stops (the run
    FAILED, nothing registered) rather than go on with nothing to resume from."""


class ArtifactCheckpoint(ModelCheckpoint):
    """Lightning's checkpoint, each save also logged as the run's artifact
    ``checkpoints/last.ckpt`` (the local file is only a cache of it)."""

    def __init__(self, run_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.start_step = 0  # the step fit began at: > 0 after a resume

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.start_step = trainer.global_step

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero and Path(filepath).name == LAST_CHECKPOINT:
            try:
                MlflowClient().log_artifact(self.run_id, filepath, CHECKPOINT_ARTIFACT_DIR)
            except Exception as err:
                raise ArtifactStoreError(_unstored(self.run_id, "its checkpoint", err)) from err


def _unstored(run_id: str, what: str, err: Exception) -> str:
    return (
        f"run {run_id}: {what} could not be stored as an artifact; is the artifact store "
        f"reachable? ({type(err).__name__}: {str(err)[:300]})"
    )


def fetch_checkpoint(run_id: str, checkpoint_dir: Path) -> Path | None:
    """The run's newest checkpoint as a local file in ``checkpoint_dir``: its artifact (the
    one every machine sees, and the newest: a local file may be one that another machine has
    since trained past), else a local file the artifact upload missed; None if neither."""
    local = checkpoint_dir / LAST_CHECKPOINT
    wanted = f"{CHECKPOINT_ARTIFACT_DIR}/{LAST_CHECKPOINT}"
    names = {a.path for a in MlflowClient().list_artifacts(run_id, CHECKPOINT_ARTIFACT_DIR)}
    if wanted in names:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        downloaded = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=wanted, dst_path=str(checkpoint_dir / ".download")
        )
        Path(downloaded).replace(local)
        log.info("checkpoint of run %s fetched from its artifacts into %s", run_id, local)
        return local
    return local if local.exists() else None


def _strategy(config: TrainConfig) -> Any:
    """Lightning's strategy for ``config``: one device, or DDP whose ranks are started inside
    ``fit`` (forked on CPU, spawned on GPUs), so that only this process — rank 0 — has the
    MLflow run, logs and registers; the ranks' results come back to it when fit ends. (A
    launcher that re-runs the script would start a second run per rank.)"""
    if config.devices == 1:
        return "auto"
    from lightning.pytorch.strategies import DDPStrategy

    on_cpu = config.resolved_device() == "cpu"
    return DDPStrategy(
        start_method="fork" if on_cpu else "spawn",
        process_group_backend="gloo" if on_cpu else "nccl",
    )


def total_steps_for(config: TrainConfig, n_train_tokens: int) -> int:
    batch = min(config.batch_size, n_train_tokens)
    return max(1, math.ceil(config.resolved_training_tokens() / batch))


def fit_sae(
    config: TrainConfig,
    sae: SparseAutoencoder,
    data: ActivationDataModule,
    *,
    run_id: str,
    checkpoint_dir: Path,
    resume: bool = False,
) -> SparseAutoencoder:
    """Train ``sae`` with Lightning, logging per-step metrics into the MLflow run ``run_id``."""
    total_steps = total_steps_for(config, data.train_ND.shape[0])
    module = SAETrainingModule(
        sae,
        lr=config.lr,
        total_steps=total_steps,
        warmup_steps=config.warmup_steps,
        decay_fraction=config.decay_fraction,
    )
    logger = MLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run_id, log_model=False)
    checkpoints = ArtifactCheckpoint(
        run_id,
        dirpath=checkpoint_dir,
        save_last=True,
        save_top_k=0,
        every_n_train_steps=config.checkpoint_every_n_steps or max(50, total_steps // 10),
        # Always last.ckpt (never last-v1.ckpt), also when a resume lands in a fresh folder:
        # that is the name uploaded as the run's checkpoint artifact.
        enable_version_counter=False,
    )
    trainer = pl.Trainer(
        accelerator=config.resolved_device(),
        devices=config.devices,
        strategy=_strategy(config),
        precision=config.precision,
        max_steps=total_steps,
        logger=logger,
        callbacks=[checkpoints],
        log_every_n_steps=config.log_every_n_steps,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=checkpoint_dir,
    )
    last = fetch_checkpoint(run_id, checkpoint_dir) if resume else None
    ckpt_path = str(last) if last is not None else None
    if resume and ckpt_path is None:
        log.warning("run %s has no checkpoint: training from the start", run_id)
    if config.compile:
        # The loss is the whole training step's forward; an instance attribute shadows the
        # method for this fit only (removed below, so the registered SAE is the plain module).
        sae.loss = torch.compile(sae.loss)  # type: ignore[method-assign]
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    finally:
        sae.__dict__.pop("loss", None)
    elapsed = time.perf_counter() - started
    # Under ddp the ranks ran in child processes; this one got rank 0's weights back, not its
    # step counters: the run went to total_steps or raised, and began at the checkpoint's step.
    if config.devices == 1:
        start_step, end_step = checkpoints.start_step, trainer.global_step
    else:
        start_step, end_step = checkpoint_step(ckpt_path), total_steps
    if resume:
        mlflow.log_metric(RESUMED_FROM_STEP_METRIC, float(start_step))
    steps_done = end_step - start_step
    mlflow.log_metric("train_tokens_per_second", steps_done * data.batch_size / max(elapsed, 1e-9))
    return sae


def train_and_register(
    config: TrainConfig,
    harvest_result: HarvestResult,
    acts_ND: torch.Tensor,
    *,
    resume: bool = False,
    before_register: Callable[[], None] | None = None,
) -> TrainResult:
    """Inside the active MLflow run: log the config, fit, score on held-out data, register.

    ``before_register`` runs just before the version is registered (a claim's last check; it
    raises to stop the registration)."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("train_and_register needs an active MLflow run")
    run_id = run.info.run_id
    meta = harvest_result.cache.metadata
    model_name = str(meta.get("model_name", config.model))
    d_in = int(acts_ND.shape[1])
    config.validate_for_width(d_in)
    checkpoint_dir = Path(config.checkpoint_dir or Path(".saeflow") / "checkpoints" / run_id)
    checkpoint_dir = checkpoint_dir.resolve()
    # `mlflow run` has already logged the MLproject parameters (as the strings it was given);
    # add the rest. The typed config, exactly, is the JSON artifact. All of it idempotent: a
    # resume completes what a job killed early left unlogged.
    logged = mlflow.get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in config.as_params().items() if k not in logged})
    mlflow.set_tags(
        {
            RUN_TYPE_TAG: "train",
            CHECKPOINT_DIR_TAG: str(checkpoint_dir),
            "architecture": config.architecture,
            "target_l0": str(config.target_l0),
            LM_TAG: model_name,
            "harvest_run_id": harvest_result.harvest_run_id or "",
            "activation_cache": str(harvest_result.cache.directory),
            TRAINING_CODE_TAG: training_code_version(),
        }
    )
    try:
        mlflow.log_dict(config.as_params(), TRAIN_CONFIG_ARTIFACT)
    except Exception as err:
        raise ArtifactStoreError(_unstored(run_id, TRAIN_CONFIG_ARTIFACT, err)) from err
    torch.manual_seed(config.seed)
    data = ActivationDataModule(
        acts_ND, batch_size=config.batch_size, val_fraction=config.val_fraction, seed=config.seed
    )
    sae_cfg = sae_config_for(config, d_in, model_name)
    sae_cfg.metadata["d_sae"] = sae_cfg.d_sae
    sae = build_sae(sae_cfg)
    sae.initialize_from_data(data.sample(min(8192, data.train_ND.shape[0])))
    fit_sae(config, sae, data, run_id=run_id, checkpoint_dir=checkpoint_dir, resume=resume)

    if isinstance(sae, BatchTopKSAE):
        choose_threshold(sae, config, data)
    metrics = evaluate_sae(sae, data.val_ND)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise RuntimeError(f"final metrics are not finite: {metrics}; nothing registered")
    mlflow.log_metrics({f"val_{name}": value for name, value in metrics.items()})

    registered_model = config.registered_model
    if registered_model in {"", "auto"}:
        registered_model = default_registered_model_name(model_name, config.layer)
    tags = {
        "architecture": config.architecture,
        "target_l0": config.target_l0,
        "d_in": d_in,
        "d_sae": sae_cfg.d_sae,
        LM_TAG: model_name,
        "hook_name": hook_name(config.layer),
        "layer": config.layer,
        "n_tokens": config.n_tokens,
        "training_run_id": run_id,
        "source": "saeflow-train",
        # The nominal target_l0 is what was asked for; this is what the SAE does on held-out
        # activations (relu/gated only approach the target).
        L0_MEASURED_TAG: f"{metrics['l0']:.4g}",
    }
    description = (
        f"{config.architecture} SAE, d_sae {sae_cfg.d_sae} ({config.expansion}x), target L0 "
        f"{config.target_l0}, on {model_name} {hook_name(config.layer)}; trained on "
        f"{config.resolved_training_tokens():,} activations of {config.n_tokens:,} "
        f"harvested tokens from {config.dataset!r}. Held-out L0 {metrics['l0']:.2f}, "
        f"explained variance {metrics['explained_variance']:.3f}."
    )
    if before_register is not None:
        before_register()
    version = register_sae(
        sae, registered_model=registered_model, tags=tags, metrics=metrics, description=description
    )
    mlflow.set_tag(MODEL_VERSION_TAG, f"models:/{version.name}/{version.version}")
    return TrainResult(run_id=run_id, sae=sae, metrics=metrics, model_version=version)
