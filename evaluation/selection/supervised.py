"""Supervised selection (Jørgensen & Hansen; details second-hand, METHODS.md §4): each latent's
token-level firing scored against a concept's labels with a calibrated F1.

Tokens of the concept's positive texts are labelled 1, those of its negative texts 0 (special
tokens dropped); a latent "predicts" a token when it is > 0. With π the positive rate of the
data and π0 the prior the score is calibrated to,

    F1_c = 2TP / (2TP + c·FP + FN),   c = π(1 − π0) / (π0(1 − π)),

so false positives weigh as they would at prevalence π0. Latents with fewer than
``min_support`` positive supports (TP) get NaN; optionally so do latents whose output score is
below ``min_output_score`` (1e-3 in the paper). π0 defaults to 1e-3 and, with ``tune_pi0``, is
chosen from ``pi0_grid`` by the held-out F1 of the latent it ranks first on the other half.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from project.hook_cache import check_sae_fits
from project.lm import LoadedLM, residual_activations
from project.saes import SparseAutoencoder

DEFAULT_PI0 = 1e-3
# The paper's value first, so a tie keeps it.
PI0_GRID = (1e-3, 1e-4, 1e-2, 1e-1)


def calibrated_f1(tp_F: Tensor, fp_F: Tensor, fn_F: Tensor, pi: float, pi0: float) -> Tensor:
    """``2TP / (2TP + c·FP + FN)`` with ``c = π(1 − π0)/(π0(1 − π))`` (0 where undefined)."""
    if not 0 < pi < 1:
        raise ValueError(f"positive rate π={pi!r} must lie in (0, 1): give both labels")
    if not 0 < pi0 < 1:
        raise ValueError(f"π0={pi0!r} must lie in (0, 1)")
    c = pi * (1 - pi0) / (pi0 * (1 - pi))
    tp, fp, fn = tp_F.double(), fp_F.double(), fn_F.double()
    denom = 2 * tp + c * fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1e-300), torch.zeros_like(denom))


@torch.no_grad()
def _firing(
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    texts: list[str],
    max_tokens: int,
    batch_size: int = 16,
) -> list[Tensor]:
    """Per text, a [T, F] bool tensor of which latents fire on each (non-special) token."""
    tok = lm.tokenizer
    special = {t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for start in range(0, len(texts), batch_size):
        rows = [
            tok(t, truncation=True, max_length=max_tokens).input_ids
            for t in texts[start : start + batch_size]
        ]
        width = max(len(r) for r in rows)
        # Right padding: a causal LM's real positions never see the pads.
        ids_BT = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask_BT = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        acts_BTD = residual_activations(lm, ids_BT, layer, mask_BT).float().cpu()
        for b, r in enumerate(rows):
            keep_T = torch.tensor([int(t) not in special for t in r], dtype=torch.bool)
            acts_TD = acts_BTD[b, : len(r)][keep_T]
            out.append(sae.encode(acts_TD.to(sae.W_dec.dtype)) > 0)
    return out


@dataclass
class SupervisedResult:
    f1_F: Tensor  # calibrated F1 at the chosen π0, NaN for filtered latents
    support_F: Tensor  # TP: positive tokens the latent fires on
    pi0: float
    pi: float
    # The same F1 before the support and output-score filters (what a fallback ranks by).
    unfiltered_f1_F: Tensor | None = None


def _counts(pos: list[Tensor], neg: list[Tensor], F: int) -> tuple[Tensor, Tensor, int, int]:
    tp_F = sum((f.sum(dim=0) for f in pos), torch.zeros(F, dtype=torch.long))
    fp_F = sum((f.sum(dim=0) for f in neg), torch.zeros(F, dtype=torch.long))
    return tp_F, fp_F, sum(len(f) for f in pos), sum(len(f) for f in neg)


def _check_text_counts(n_positive: int, n_negative: int) -> None:
    if n_positive < 2 or n_negative < 2:
        raise ValueError(
            f"supervised selection needs >= 2 positive and >= 2 negative texts, got "
            f"{n_positive} and {n_negative}"
        )


@torch.no_grad()
def supervised_scores(
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    positives: list[str],
    negatives: list[str],
    *,
    pi0: float = DEFAULT_PI0,
    tune_pi0: bool = True,
    pi0_grid: tuple[float, ...] = PI0_GRID,
    min_support: int = 50,
    output_score_F: Tensor | None = None,
    min_output_score: float | None = None,
    max_tokens: int = 128,
) -> SupervisedResult:
    """Calibrated F1 of every latent against one concept's token labels (see module doc)."""
    check_sae_fits(sae, lm, layer)
    # Before the LM pass: score_firing checks the same, after it.
    _check_text_counts(len(positives), len(negatives))
    if min_output_score is not None and output_score_F is None:
        raise ValueError("min_output_score needs the output scores (output_score_F)")
    return score_firing(
        _firing(sae, lm, layer, positives, max_tokens),
        _firing(sae, lm, layer, negatives, max_tokens),
        sae.cfg.d_sae,
        pi0=pi0,
        tune_pi0=tune_pi0,
        pi0_grid=pi0_grid,
        min_support=min_support,
        output_score_F=output_score_F,
        min_output_score=min_output_score,
    )


def score_firing(
    pos: list[Tensor],
    neg: list[Tensor],
    d_sae: int,
    *,
    pi0: float = DEFAULT_PI0,
    tune_pi0: bool = True,
    pi0_grid: tuple[float, ...] = PI0_GRID,
    min_support: int = 50,
    output_score_F: Tensor | None = None,
    min_output_score: float | None = None,
) -> SupervisedResult:
    """Calibrated F1 of every latent from its firing ([T, F] bool per text) on a concept's
    positive and negative texts; with ``tune_pi0``, π0 is the grid value whose top latent on
    the even-indexed texts scores best (plain F1) on the odd-indexed ones, a held-out split."""
    _check_text_counts(len(pos), len(neg))
    F = d_sae
    tp_F, fp_F, n_pos, n_neg = _counts(pos, neg, F)
    keep_F = tp_F >= min_support
    if output_score_F is not None and min_output_score is not None:
        keep_F &= output_score_F.to(keep_F.device) >= min_output_score
    chosen = pi0
    if tune_pi0:
        # Even-indexed texts rank the latents, odd-indexed ones judge the top latent.
        tr_tp, tr_fp, tr_np, tr_nn = _counts(pos[::2], neg[::2], F)
        ho_tp, ho_fp, ho_np, ho_nn = _counts(pos[1::2], neg[1::2], F)
        best_f1 = -1.0
        for candidate in pi0_grid:
            f1_F = calibrated_f1(tr_tp, tr_fp, tr_np - tr_tp, tr_np / (tr_np + tr_nn), candidate)
            f1_F = torch.where(keep_F, f1_F, torch.full_like(f1_F, -1.0))
            top = int(f1_F.argmax())
            held = float(
                calibrated_f1(
                    ho_tp[top : top + 1],
                    ho_fp[top : top + 1],
                    ho_np - ho_tp[top : top + 1],
                    ho_np / (ho_np + ho_nn),
                    ho_np / (ho_np + ho_nn),  # c = 1: the held-out split's plain F1
                )[0]
            )
            if held > best_f1:
                best_f1, chosen = held, candidate
    pi = n_pos / (n_pos + n_neg)
    raw_F = calibrated_f1(tp_F, fp_F, n_pos - tp_F, pi, chosen)
    f1_F = torch.where(keep_F, raw_F, torch.full_like(raw_F, float("nan")))
    return SupervisedResult(f1_F, tp_F, chosen, pi, raw_F)


def top_latents(
    result: SupervisedResult, k: int, candidates: list[int] | None = None
) -> tuple[list[int], bool]:
    """The ``k`` best latents by calibrated F1 among ``candidates`` (all latents if None),
    best first, ties to the smaller id; and whether the support filter had to be dropped
    (no candidate had ``min_support`` positive supports: then the best by F1 over latents that
    fire on any positive token, so a concept is never left without a latent silently)."""
    if k < 1:
        raise ValueError(f"K={k!r} must be >= 1 (latents steered together per concept)")
    ids = torch.arange(len(result.f1_F)) if candidates is None else torch.tensor(candidates)
    f1 = result.f1_F[ids].double()
    fallback = not bool(torch.isfinite(f1).any())
    if fallback:
        if result.unfiltered_f1_F is None:
            raise ValueError("no candidate passed the filters and no unfiltered F1 was kept")
        raw = result.unfiltered_f1_F[ids].double()
        f1 = torch.where(result.support_F[ids] > 0, raw, torch.full_like(raw, math.nan))
    order = sorted(
        (i for i in range(len(ids)) if math.isfinite(float(f1[i]))),
        key=lambda i: (-float(f1[i]), int(ids[i])),
    )
    return [int(ids[i]) for i in order[:k]], fallback


@dataclass(frozen=True)
class ConceptLatents:
    """Supervised select-and-label for one concept: the top latents by calibrated F1 against
    its own labels (best first), named by the concept; with their F1, support and π0."""

    concept: str
    latents: tuple[int, ...]
    f1: tuple[float, ...]
    support: tuple[int, ...]
    pi0: float
    support_fallback: bool  # no candidate had min_support positive supports


@torch.no_grad()
def select_and_label(
    sae: SparseAutoencoder,
    acts_ND: Tensor,
    text_N: Tensor,
    concept: str,
    positive_texts: Sequence[int],
    negative_texts: Sequence[int],
    k: int,
    candidates: list[int] | None = None,
    *,
    min_support: int = 50,
    tune_pi0: bool = True,
) -> ConceptLatents:
    """The ``k`` latents that best detect ``concept`` token by token: each latent's firing
    (> 0) on the tokens of the concept's positive texts (label 1) and negative texts (label 0)
    scored by calibrated F1 (π0 tuned on a held-out split), latents with fewer than
    ``min_support`` positive supports left out, best first among ``candidates``.

    ``acts_ND`` / ``text_N``: hook activations of every real token and the text each comes
    from (as :func:`evaluation.steering.protocol.example_activations` returns them), so the
    LM pass that DiffMean and the AUROC choice already made is reused."""
    if not positive_texts:
        raise ValueError(f"concept {concept!r} has no positive texts: nothing to select against")
    if not negative_texts:
        raise ValueError(f"concept {concept!r} has no negative texts: nothing to select against")
    firing: dict[int, Tensor] = {}
    wanted = torch.tensor(sorted({*positive_texts, *negative_texts}))
    rows = torch.isin(text_N, wanted).nonzero()[:, 0]
    codes = torch.cat(
        [sae.encode(chunk.to(sae.W_dec.dtype)) > 0 for chunk in acts_ND[rows].split(4096)]
    )
    owners = text_N[rows]
    for text in wanted.tolist():
        firing[text] = codes[owners == text]
    result = score_firing(
        [firing[t] for t in positive_texts],
        [firing[t] for t in negative_texts],
        sae.cfg.d_sae,
        min_support=min_support,
        tune_pi0=tune_pi0,
    )
    latents, fallback = top_latents(result, k, candidates)
    values = result.f1_F if not fallback else result.unfiltered_f1_F
    assert values is not None
    return ConceptLatents(
        concept,
        tuple(latents),
        tuple(float(values[i]) for i in latents),
        tuple(int(result.support_F[i]) for i in latents),
        result.pi0,
        fallback,
    )
