"""core: SAEBench's core metrics for one SAE at one residual-stream hook.

Reconstruction and sparsity metrics (``l0``, ``l1``, ``explained_variance``, ``mse``,
``cossim``, shrinkage, dead and dense latent fractions) are computed on ``n_tokens`` hook
activations of held-out text (the corpus's eval region, which no harvest reads), position 0 of every window excluded (the BOS / attention-sink
token, which the harvest also drops). Downstream metrics (``ce_loss_score``, ``kl_div_score``
and their parts) splice the SAE's reconstruction into the LM at the hook and compare with the
clean LM and with zero ablation of the hook, over every predicted position of the first
``n_ce_windows`` windows.

The hook activations, the clean next-token log-probabilities and the zero-ablation losses do not
depend on the SAE: they come from a :class:`~project.hook_cache.HookCache`, so evaluating
many SAEs runs, per SAE, only the SAE and the LM blocks after the hook.

Definitions (METHODS.md §2; names as SAELens / SAEBench):

- ``explained_variance`` = 1 − Var(x − x̂)/Var(x), variances summed over dimensions (the
  METHODS formula, which the training metrics use too; SAELens 6.54 divides E‖x − x̂‖² instead,
  which differs by ‖E[x − x̂]‖²/Var(x)); ``explained_variance_legacy`` = mean over tokens of
  1 − ‖x − x̂‖²/‖x − E x‖².
- ``mse`` = mean over tokens and dimensions of (x − x̂)² (SAEBench core's, and the training's).
- ``ce_loss_score`` = (CE_ablation − CE_sae)/(CE_ablation − CE_clean); ``kl_div_score`` =
  (KL_ablation − KL_sae)/KL_ablation, KL(clean ‖ spliced) summed over the vocabulary.
- The splice keeps position 0 as the LM computed it (SAELens keeps special tokens unspliced);
  ``splice_first_position=True`` reconstructs it too. Zero ablation zeroes every position.
- ``freq_over_1_percent`` (dense fraction): latents active on > 1% of tokens;
  ``frac_dead_latents`` = 1 − ``frac_alive``: latents never active on the evaluation tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from evaluation.interpretability.schema import EvalOutput
from project.corpus import (
    DEFAULT_CORPUS,
    CorpusSpec,
    iter_texts,
    region_description,
    resolve_corpus,
    token_windows,
)
from project.hook_cache import HookCache, check_sae_fits, logits_from_hook
from project.lm import LoadedLM
from project.saes import SparseAutoencoder
from project.saes.base import explained_variance

logger = logging.getLogger(__name__)

EVAL_TYPE_ID = "core"
# Clean log-probs of the CE/KL windows are kept in memory (one LM pass per SAE instead of two)
# when they take at most this much: 32 × 127 × 49,152 fp32 for SmolLM2 is 0.8 GB.
MAX_CACHED_LOGPROB_BYTES = 1 << 30
_BASELINE_KIND = "core-baseline-v1"
_LOGPROB_KIND = "core-clean-logprobs-v1"


@dataclass
class CoreConfig:
    """What core evaluates on; the defaults take well under a minute per SmolLM2 SAE on 2 CPUs.

    - ``dataset`` / ``text_column`` / ``split``: a corpus as ``project.corpus.resolve_corpus``
      takes it; core reads only its eval region, disjoint from every harvest's text.
      ``corpus_region`` (set, not an input) states that region's rule in the logged config.
    - ``n_tokens``: activations for the reconstruction and sparsity metrics (position 0 of
      each window excluded). ``n_ce_windows``: windows of ``context_size`` tokens for CE/KL
      (the first windows of the same set).
    """

    dataset: str = DEFAULT_CORPUS
    text_column: str = "text"
    split: str = "train"
    context_size: int = 128
    n_tokens: int = 16_384
    n_ce_windows: int = 32
    batch_size: int = 8
    sae_batch_tokens: int = 4096
    splice_first_position: bool = False
    corpus_region: str = field(init=False, default="")

    def __post_init__(self) -> None:
        for name in ("n_tokens", "n_ce_windows", "batch_size", "sae_batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"core {name}={value!r} must be a positive integer")
        if not isinstance(self.context_size, int) or self.context_size < 3:
            raise ValueError(f"core context_size={self.context_size!r} must be an integer >= 3")
        if not self.dataset or not self.text_column:
            raise ValueError("core dataset and text_column must be non-empty")
        self.corpus_region = region_description(CorpusSpec(self.dataset, self.text_column))

    def validate(self) -> None:
        """Checks that read the corpus (existence, columns), run before any evaluation."""
        resolve_corpus(self.dataset, text_column=self.text_column, split=self.split)

    @property
    def n_windows(self) -> int:
        return max(math.ceil(self.n_tokens / (self.context_size - 1)), self.n_ce_windows)


# ---------------------------------------------------------------------------------------------
# evaluation tokens


@lru_cache(maxsize=8)
def _windows(
    dataset: str,
    text_column: str,
    split: str,
    context_size: int,
    n_windows: int,
    tokenizer: PreTrainedTokenizerBase,  # hashed by identity: one entry per loaded tokenizer
) -> Tensor:
    spec = resolve_corpus(dataset, text_column=text_column, split=split)
    texts = iter_texts(spec, "eval")  # never text a harvest trained on
    windows = list(token_windows(texts, tokenizer, context_size, n_windows * context_size))
    if len(windows) < n_windows:
        raise ValueError(
            f"corpus {dataset!r} yields only {len(windows)} windows of {context_size} tokens; "
            f"in its eval region; core needs {n_windows} (lower n_tokens / n_ce_windows)"
        )
    return torch.stack(windows)


def eval_windows(config: CoreConfig, tokenizer: PreTrainedTokenizerBase) -> Tensor:
    """The evaluation token windows [W, T] (W = ``config.n_windows``), deterministic."""
    return _windows(
        config.dataset,
        config.text_column,
        config.split,
        config.context_size,
        config.n_windows,
        tokenizer,
    )


# ---------------------------------------------------------------------------------------------
# reconstruction and sparsity


@torch.no_grad()
def reconstruction_metrics(
    sae: SparseAutoencoder, x_ND: Tensor, batch_tokens: int = 4096
) -> tuple[dict[str, dict[str, float]], Tensor]:
    """Reconstruction, shrinkage, sparsity and latent-frequency metrics; and per-latent density.

    Returns ``({category: {metric: value}}, density_F)`` with density the fraction of the N
    tokens on which each latent is non-zero.
    """
    n, d = x_ND.shape
    x64_ND = x_ND.double()
    mean_D = x64_ND.mean(dim=0)
    x_hat_chunks: list[Tensor] = []
    sq_r = sq_out = dot = legacy = cos = l2_in = l2_out = ratio = l0 = l1 = 0.0
    fired_F = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for start in range(0, n, batch_tokens):
        x_BD = x_ND[start : start + batch_tokens].float()
        f_BF = sae.encode(x_BD)
        x_hat_BD = sae.decode(f_BF).float()
        x_hat_chunks.append(x_hat_BD)
        r_BD = (x_BD - x_hat_BD).double()
        xd_BD, xhd_BD = x_BD.double(), x_hat_BD.double()
        sq_r_B = r_BD.pow(2).sum(dim=-1)
        sq_r += sq_r_B.sum().item()
        sq_out += xhd_BD.pow(2).sum().item()
        dot += (xd_BD * xhd_BD).sum().item()
        legacy += (1 - sq_r_B / (xd_BD - mean_D).pow(2).sum(dim=-1).clamp_min(1e-12)).sum().item()
        cos += F.cosine_similarity(xd_BD, xhd_BD, dim=-1).sum().item()
        norm_in_B, norm_out_B = xd_BD.norm(dim=-1), xhd_BD.norm(dim=-1)
        l2_in += norm_in_B.sum().item()
        l2_out += norm_out_B.sum().item()
        # SAELens: a (near-)zero input norm counts as 1 in the ratio's denominator.
        ratio += (norm_out_B / torch.where(norm_in_B < 1e-4, 1.0, norm_in_B)).sum().item()
        active_BF = f_BF != 0
        l0 += active_BF.sum().item()
        l1 += f_BF.abs().double().sum().item()
        fired_F += active_BF.sum(dim=0).double()
    # The training's definition, in float64 so that EV near 1 keeps its digits.
    has_variance = x64_ND.var(dim=0).sum().item() > 0
    ev = explained_variance(x64_ND, torch.cat(x_hat_chunks).double()).item()
    density_F = fired_F / n
    total_density = density_F.sum().clamp_min(1e-12)
    over1_F, over10_F = density_F > 0.01, density_F > 0.1
    frac_alive = (density_F > 0).double().mean().item()
    metrics = {
        "reconstruction_quality": {
            "explained_variance": ev if has_variance else math.nan,
            "explained_variance_legacy": legacy / n,
            "mse": sq_r / (n * d),
            "cossim": cos / n,
        },
        "shrinkage": {
            "l2_norm_in": l2_in / n,
            "l2_norm_out": l2_out / n,
            "l2_ratio": ratio / n,
            "relative_reconstruction_bias": (sq_out / n) / (dot / n) if dot else math.nan,
        },
        "sparsity": {"l0": l0 / n, "l1": l1 / n},
        "misc_metrics": {
            "frac_alive": frac_alive,
            "frac_dead_latents": 1 - frac_alive,
            "freq_over_1_percent": over1_F.double().mean().item(),
            "freq_over_10_percent": over10_F.double().mean().item(),
            "normalized_freq_over_1_percent": (density_F[over1_F].sum() / total_density).item(),
            "normalized_freq_over_10_percent": (density_F[over10_F].sum() / total_density).item(),
            "average_max_encoder_cosine_sim": average_max_cosine_sim(sae.W_enc.T),
            "average_max_decoder_cosine_sim": average_max_cosine_sim(sae.W_dec),
        },
    }
    return metrics, density_F.float()


@torch.no_grad()
def average_max_cosine_sim(vectors_FD: Tensor, chunk: int = 1024) -> float:
    """Mean over latents of the largest cosine similarity with any other latent (SAEBench)."""
    unit_FD = F.normalize(vectors_FD.detach().float(), dim=-1)
    n = unit_FD.shape[0]
    best = 0.0
    for start in range(0, n, chunk):
        sims_CF = unit_FD[start : start + chunk] @ unit_FD.T
        rows = torch.arange(sims_CF.shape[0])
        sims_CF[rows, rows + start] = -math.inf  # not with itself
        best += sims_CF.max(dim=-1).values.sum().item()
    return best / n


# ---------------------------------------------------------------------------------------------
# downstream: CE and KL with the SAE spliced in


def _ce_per_token(logp_BSV: Tensor, targets_BS: Tensor) -> Tensor:
    return -logp_BSV.gather(-1, targets_BS[..., None]).squeeze(-1)


def _kl_per_token(logp_clean_BSV: Tensor, logp_BSV: Tensor) -> Tensor:
    """KL(clean ‖ other) per position, summed over the vocabulary."""
    return (logp_clean_BSV.exp() * (logp_clean_BSV - logp_BSV)).sum(dim=-1)


def _predicted_logp(lm: LoadedLM, layer: int, ids_BT: Tensor, hidden_BTD: Tensor) -> Tensor:
    """Log-probs at the predicted positions 0..T-2, [B, T-1, V]."""
    logits_BTV = logits_from_hook(lm, layer, ids_BT, hidden_BTD)
    return torch.log_softmax(logits_BTV[:, :-1], dim=-1)


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _clean_and_ablation(
    lm: LoadedLM,
    layer: int,
    ids_WT: Tensor,
    acts_WTD: Tensor,
    batch_size: int,
    keep_logp_vocab: int | None,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Per-position CE of the clean and the zero-ablated LM and KL(clean ‖ ablated)."""
    w, t = ids_WT.shape
    ce_clean_WS = torch.zeros(w, t - 1)
    ce_abl_WS = torch.zeros(w, t - 1)
    kl_abl_WS = torch.zeros(w, t - 1)
    logp_WSV = None if keep_logp_vocab is None else torch.empty(w, t - 1, keep_logp_vocab)
    # With the hook zeroed at every position, the blocks after it see no trace of the tokens
    # (only positions, which every window shares), so one window's ablated output is every
    # window's: one row instead of a whole LM pass.
    logp_abl_1SV = _predicted_logp(lm, layer, ids_WT[:1], torch.zeros_like(acts_WTD[:1]))
    for sl in tqdm(list(_batches(w, batch_size)), desc="core: clean LM", leave=False):
        ids_BT, targets_BS = ids_WT[sl], ids_WT[sl, 1:]
        logp_clean = _predicted_logp(lm, layer, ids_BT, acts_WTD[sl])
        logp_abl = logp_abl_1SV.expand_as(logp_clean)
        if logp_WSV is not None:
            logp_WSV[sl] = logp_clean
        ce_clean_WS[sl] = _ce_per_token(logp_clean, targets_BS)
        ce_abl_WS[sl] = _ce_per_token(logp_abl, targets_BS)
        kl_abl_WS[sl] = _kl_per_token(logp_clean, logp_abl)
    return {"ce_clean": ce_clean_WS, "ce_ablation": ce_abl_WS, "kl_ablation": kl_abl_WS}, logp_WSV


@torch.no_grad()
def downstream_metrics(
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    ids_WT: Tensor,
    acts_WTD: Tensor,
    config: CoreConfig,
    hook_cache: HookCache,
) -> dict[str, dict[str, float]]:
    """CE and KL with the SAE spliced in vs clean and zero-ablated, over predicted positions."""
    w, t = ids_WT.shape
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    keep_logp = w * (t - 1) * vocab * 4 <= MAX_CACHED_LOGPROB_BYTES
    fresh: dict[str, Tensor] = {}

    def compute_baseline() -> dict[str, Tensor]:
        baseline, logp = _clean_and_ablation(
            lm, layer, ids_WT, acts_WTD, config.batch_size, vocab if keep_logp else None
        )
        if logp is not None:
            fresh["logp"] = logp
        return baseline

    base = hook_cache.derived(_BASELINE_KIND, lm, layer, ids_WT, compute_baseline)
    logp_clean_WSV: Tensor | None = None
    if keep_logp:

        def compute_logp() -> dict[str, Tensor]:
            if "logp" not in fresh:  # baseline came from disk: one clean pass to refill memory
                logp = torch.cat(
                    [
                        _predicted_logp(lm, layer, ids_WT[sl], acts_WTD[sl])
                        for sl in _batches(w, config.batch_size)
                    ]
                )
                fresh["logp"] = logp
            return {"logp": fresh["logp"]}

        logp_clean_WSV = hook_cache.derived(
            _LOGPROB_KIND, lm, layer, ids_WT, compute_logp, persist=False
        )["logp"]

    first = 0 if config.splice_first_position else 1
    ce_sae_WS = torch.zeros(w, t - 1)
    kl_sae_WS = torch.zeros(w, t - 1)
    for sl in tqdm(list(_batches(w, config.batch_size)), desc="core: SAE spliced", leave=False):
        acts_BTD = acts_WTD[sl]
        b = acts_BTD.shape[0]
        spliced_BTD = acts_BTD.clone()
        x_ND = acts_BTD[:, first:].reshape(-1, acts_BTD.shape[-1])
        spliced_BTD[:, first:] = sae.decode(sae.encode(x_ND)).float().reshape(b, t - first, -1)
        logp_sae = _predicted_logp(lm, layer, ids_WT[sl], spliced_BTD)
        if logp_clean_WSV is not None:
            logp_clean = logp_clean_WSV[sl]
        else:
            logp_clean = _predicted_logp(lm, layer, ids_WT[sl], acts_BTD)
        ce_sae_WS[sl] = _ce_per_token(logp_sae, ids_WT[sl, 1:])
        kl_sae_WS[sl] = _kl_per_token(logp_clean, logp_sae)

    ce_clean = base["ce_clean"].double().mean().item()
    ce_abl = base["ce_ablation"].double().mean().item()
    kl_abl = base["kl_ablation"].double().mean().item()
    ce_sae = ce_sae_WS.double().mean().item()
    kl_sae = kl_sae_WS.double().mean().item()
    return {
        "model_behavior_preservation": {
            "kl_div_score": (kl_abl - kl_sae) / kl_abl if kl_abl else math.nan,
            "kl_div_with_ablation": kl_abl,
            "kl_div_with_sae": kl_sae,
        },
        "model_performance_preservation": {
            "ce_loss_score": (ce_abl - ce_sae) / (ce_abl - ce_clean)
            if ce_abl != ce_clean
            else math.nan,
            "ce_loss_with_ablation": ce_abl,
            "ce_loss_with_sae": ce_sae,
            "ce_loss_without_sae": ce_clean,
        },
    }


# ---------------------------------------------------------------------------------------------
# entry


def compute(
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    config: CoreConfig,
    hook_cache: HookCache | None = None,
) -> EvalOutput:
    """All core metrics of ``sae`` (trained on block ``layer``'s output of ``lm``)."""
    check_sae_fits(sae, lm, layer)
    hook_cache = hook_cache if hook_cache is not None else HookCache()
    sae.eval()
    ids_WT = eval_windows(config, lm.tokenizer)
    acts_WTD = hook_cache.activations(lm, layer, ids_WT, desc="core: hook activations")
    # Reconstruction tokens: every window's positions 1.., in order, the first n_tokens.
    x_ND = acts_WTD[:, 1:].reshape(-1, lm.d_model)[: config.n_tokens]
    with torch.no_grad():
        metrics, density_F = reconstruction_metrics(sae, x_ND, config.sae_batch_tokens)
    ce_ids_WT = ids_WT[: config.n_ce_windows]
    metrics.update(
        downstream_metrics(
            sae, lm, layer, ce_ids_WT, acts_WTD[: config.n_ce_windows], config, hook_cache
        )
    )
    t = config.context_size
    metrics["token_stats"] = {
        "total_tokens_eval_reconstruction": float(config.n_ce_windows * (t - 1)),
        "total_tokens_eval_sparsity_variance": float(x_ND.shape[0]),
    }
    ordered = {
        name: metrics[name]
        for name in (
            "model_behavior_preservation",
            "model_performance_preservation",
            "reconstruction_quality",
            "shrinkage",
            "sparsity",
            "misc_metrics",
            "token_stats",
        )
    }
    logger.info(
        "core: l0 %.2f, explained variance %.4f, CE score %.4f, KL score %.4f",
        ordered["sparsity"]["l0"],
        ordered["reconstruction_quality"]["explained_variance"],
        ordered["model_performance_preservation"]["ce_loss_score"],
        ordered["model_behavior_preservation"]["kl_div_score"],
    )
    return EvalOutput(
        metrics=ordered,
        unstructured={"feature_density": density_F.tolist()},
    )
