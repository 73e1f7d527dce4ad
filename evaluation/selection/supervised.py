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


def _counts(pos: list[Tensor], neg: list[Tensor], F: int) -> tuple[Tensor, Tensor, int, int]:
    tp_F = sum((f.sum(dim=0) for f in pos), torch.zeros(F, dtype=torch.long))
    fp_F = sum((f.sum(dim=0) for f in neg), torch.zeros(F, dtype=torch.long))
    return tp_F, fp_F, sum(len(f) for f in pos), sum(len(f) for f in neg)


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
    if len(positives) < 2 or len(negatives) < 2:
        raise ValueError(
            f"supervised selection needs >= 2 positive and >= 2 negative texts, got "
            f"{len(positives)} and {len(negatives)}"
        )
    if min_output_score is not None and output_score_F is None:
        raise ValueError("min_output_score needs the output scores (output_score_F)")
    F = sae.cfg.d_sae
    pos, neg = (
        _firing(sae, lm, layer, positives, max_tokens),
        _firing(sae, lm, layer, negatives, max_tokens),
    )
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
    f1_F = calibrated_f1(tp_F, fp_F, n_pos - tp_F, pi, chosen)
    f1_F = torch.where(keep_F, f1_F, torch.full_like(f1_F, float("nan")))
    return SupervisedResult(f1_F, tp_F, chosen, pi)
