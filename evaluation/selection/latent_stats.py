"""The per-latent table of a registered SAE: max activation ``m_i`` and firing frequency on
held-out text (the eval region of the corpus), measured once per (version, config).

It is logged as the table ``latent_stats.json`` (columns ``latent``, ``max_activation``,
``firing_frequency``) of a run tagged ``saeflow.run_type=latent_stats``, linked to the version
like eval runs (``registered_model``, ``model_version``, ``model_uri``, ``lm_name``) and found
again by ``eval_config_hash``; the version gets the tag ``latent_stats.run_id``. Steering,
selection and the analysis read it with :func:`latent_stats_for_version`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from torch import Tensor
from tqdm.auto import tqdm

from evaluation.selection.config import LatentStatsConfig
from project.corpus import (
    eval_windows,
    region_description,
    resolve_corpus,
)
from project.hook_cache import check_sae_fits, shared_hook_cache
from project.lm import LoadedLM
from project.runs import config_hash, find_finished_run, run_tags
from project.saes import SparseAutoencoder
from project.tracking import RUN_TYPE_TAG, set_version_tag

logger = logging.getLogger(__name__)

STATS_RUN_TYPE = "latent_stats"
STATS_TABLE = "latent_stats.json"
VERSION_LINK_TAG = "latent_stats.run_id"
_ENCODE_CHUNK = 4096


# Reading and tokenising a corpus takes seconds: the held-out windows once a process.
_WINDOWS: dict[tuple[str, str, str, int, int], Tensor] = {}


def _held_out_windows(lm: LoadedLM, config: LatentStatsConfig) -> Tensor:
    key = (
        config.corpus,
        config.text_column,
        str(getattr(lm.tokenizer, "name_or_path", lm.name)),
        config.context_size,
        config.n_tokens,
    )
    if key not in _WINDOWS:
        _WINDOWS.clear()
        _WINDOWS[key] = eval_windows(
            config.corpus,
            lm.tokenizer,
            config.context_size,
            config.n_tokens,
            text_column=config.text_column,
        )
    return _WINDOWS[key]


@torch.no_grad()
def measure_latent_stats(
    sae: SparseAutoencoder, lm: LoadedLM, layer: int, config: LatentStatsConfig
) -> dict[str, Tensor]:
    """``max_activation`` [F] and ``firing_frequency`` [F] (share of counted tokens where the
    latent is > 0) over ``config.n_tokens`` held-out tokens, plus ``n_tokens`` counted."""
    check_sae_fits(sae, lm, layer)
    ids_WT = _held_out_windows(lm, config)
    special = [
        t
        for t in {lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id}
        if t is not None
    ]
    keep_WT = torch.ones_like(ids_WT, dtype=torch.bool)
    for t in special:
        keep_WT &= ids_WT != t
    # The residual stream of the held-out windows depends on the LM and layer only: every SAE
    # of a study's grid at that site is measured on one LM pass.
    acts_WTD = shared_hook_cache().activations(
        lm, layer, ids_WT, desc="latent stats: LM", batch_size=config.lm_batch_size
    )
    acts_ND = acts_WTD[keep_WT]
    F = sae.cfg.d_sae
    max_F = torch.zeros(F)
    fired_F = torch.zeros(F, dtype=torch.long)
    was_training = sae.training
    sae.eval()
    try:
        for chunk in tqdm(acts_ND.split(_ENCODE_CHUNK), desc="latent stats", leave=False):
            f_NF = sae.encode(chunk.to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()
            max_F = torch.maximum(max_F, f_NF.max(dim=0).values)
            fired_F += (f_NF > 0).sum(dim=0)
    finally:
        sae.train(was_training)
    counted = int(keep_WT.sum())
    return {
        "max_activation": max_F,
        "firing_frequency": fired_F.float() / max(counted, 1),
        "n_tokens": torch.tensor(counted),
    }


def _read_table(run_id: str) -> dict[str, Tensor]:
    # The fluent mlflow.load_table searches only the active experiment; the stats run may live in
    # another one (a steer run in experiment B reusing stats logged from experiment A).
    client = MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    df = client.load_table(experiment_id, STATS_TABLE, run_ids=[run_id])
    df = df.sort_values("latent")
    return {
        "max_activation": torch.tensor(df["max_activation"].to_numpy(), dtype=torch.float32),
        "firing_frequency": torch.tensor(df["firing_frequency"].to_numpy(), dtype=torch.float32),
    }


def latent_stats_for_version(
    mv: ModelVersion,
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    config: LatentStatsConfig,
    *,
    force: bool = False,
) -> tuple[dict[str, Tensor], str, bool]:
    """(table, run id, reused): the version's latent table for ``config``, read from its
    FINISHED ``latent_stats`` run, else measured and logged as a new run."""
    digest = config_hash(STATS_RUN_TYPE, asdict(config), None, mv)
    existing = None if force else find_finished_run(mv, STATS_RUN_TYPE, digest)
    if existing is not None:
        logger.info(
            "latent stats of %s/%s: reusing run %s", mv.name, mv.version, existing.info.run_id
        )
        return _read_table(existing.info.run_id), existing.info.run_id, True
    started = time.perf_counter()
    stats = measure_latent_stats(sae, lm, layer, config)
    tags = run_tags(mv, STATS_RUN_TYPE, digest)
    tags[RUN_TYPE_TAG] = STATS_RUN_TYPE
    with mlflow.start_run(
        run_name=f"latent-stats-{mv.name}-v{mv.version}",
        nested=mlflow.active_run() is not None,
        tags=tags,
    ) as run:
        params = {f"stats_{k}": str(v) for k, v in asdict(config).items()}
        params["region"] = region_description(
            resolve_corpus(config.corpus, text_column=config.text_column)
        )
        mlflow.log_params(params)
        F = len(stats["max_activation"])
        mlflow.log_table(
            {
                "latent": list(range(F)),
                "max_activation": stats["max_activation"].tolist(),
                "firing_frequency": stats["firing_frequency"].tolist(),
            },
            STATS_TABLE,
        )
        live = stats["firing_frequency"] > 0
        mlflow.log_metrics(
            {
                "n_tokens": float(stats["n_tokens"]),
                "live_fraction": float(live.float().mean()),
                "median_live_max_activation": float(stats["max_activation"][live].median())
                if bool(live.any())
                else 0.0,
                "stats_seconds": time.perf_counter() - started,
            }
        )
    set_version_tag(mv.name, mv.version, VERSION_LINK_TAG, run.info.run_id)
    logger.info(
        "latent stats of %s/%s measured on %d tokens in %.1fs (run %s)",
        mv.name,
        mv.version,
        int(stats["n_tokens"]),
        time.perf_counter() - started,
        run.info.run_id,
    )
    return stats, run.info.run_id, False
