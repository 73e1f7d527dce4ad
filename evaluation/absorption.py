"""Feature absorption on the first-letter task (SAEBench's protocol, METHODS.md §2).

Data. The words are the LM's own vocabulary tokens that are a leading space plus ASCII
letters (" cat"; at least ``min_word_chars`` letters); the label is the first letter,
lower-cased. Letters with fewer than ``min_tokens_per_letter`` such tokens are left out; at most
``max_tokens_per_letter`` (seeded sample) are used per letter, split ``test_fraction`` for test.
Each word is read in SAEBench's in-context prompt: ``n_icl_examples`` vocabulary words (not
among the evaluated ones) formatted as ``"{word} has the first letter: {LETTER}"``, one per line,
then a new line and the word; the activation is the residual stream after ``layer`` at the
word's token. Because the LM is causal, the text after the word in SAEBench's template cannot
change that activation, so the prompt stops at the word, and the shared prefix is run once and
reused through the KV cache (one token of compute per word). SAEBench shuffles the in-context
examples per word; here one fixed seeded set serves every word.

Per letter c:

1. A logistic probe "starts with c" (one-vs-rest, class-balanced, L2) on the LM activations of
   the training words; its unit direction p_c in activation space.
2. Main latents by k-sparse probing: latents ranked by mean activation on c-words minus on the
   others (training words); for k = 1 .. ``max_k_value`` a logistic probe on the top-k latents;
   k grows while the test F1 rises by more than ``f1_jump_threshold`` (0.03). The kept top-k
   are the main (split) latents; their count is the letter's ``num_split_features``.
3. On test c-words where the probe fires (probe true positives), with a = x·p_c and each
   latent's share s_i = f_i (d_i · p_c) of the projection of the reconstruction (d_i the
   decoder row; f_i·cos(d_i, p_c) as in SAEBench when rows have unit norm):
   - absorption fraction: 0 if the main latents carry all of a (Σ_main s_i ≥ a) or if the
     top ``absorption_fraction_max_absorbing_latents`` (3) other latents with
     cos(d_i, p_c) ≥ 0.1 and s_i > 0 carry less than 0.4·a; 1 if the main latents carry
     nothing; else absorbed / (absorbed + main) with absorbed = min(their sum, a - main);
   - full absorption: no main latent fires, the top-projecting latent has cos ≥ 0.025, a > 0
     and that latent carries ≥ 0.4·a.
   The letter's scores are the means over its probe true positives.

Reported: in category ``mean`` (SAEBench's), ``mean_absorption_fraction_score``,
``mean_full_absorption_score``, ``mean_num_split_features`` (means over letters, letters with no
probe true positive left out) and their standard deviations; in ``first_letter_latents``,
``mean_main_latents_test_f1`` (test F1 of the k-sparse probe on the main latents) and
``mean_probe_test_f1`` (the LM probe's). Per letter in the details.

Absorption scores low for two opposite reasons: the SAE's letter latents fire where they should
(good), or the SAE has no letter latents at all, so nothing can absorb them (a random SAE, or an
SAE too small or too briefly trained to learn them). ``mean_main_latents_test_f1`` tells the two
apart; read the absorption scores together with it.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

try:
    from transformers import DynamicCache
except ImportError:  # pragma: no cover - every supported transformers has it
    DynamicCache = None
from tqdm.auto import tqdm

from evaluation.hook_cache import check_sae_fits
from evaluation.schema import EvalOutput
from project.checks import check_in_range, check_ints
from project.lm import LoadedLM, decoder_blocks
from project.saes.base import SparseAutoencoder

logger = logging.getLogger(__name__)

EVAL_TYPE_ID = "absorption_first_letter"
_EPS = 1e-8
_WORD_RE = re.compile(r" [A-Za-z]+")


@dataclass
class AbsorptionConfig:
    """Settings of the first-letter absorption eval (SAEBench's thresholds; sizes kept small so
    one SmolLM2 SAE takes seconds, see the module docstring)."""

    prompt_template: str = "{word} has the first letter: {letter}"
    n_icl_examples: int = 10
    min_word_chars: int = 2
    max_tokens_per_letter: int = 200
    min_tokens_per_letter: int = 20
    test_fraction: float = 0.5
    max_k_value: int = 10
    f1_jump_threshold: float = 0.03
    probe_l2: float = 1e-3
    absorption_fraction_probe_cos_sim_threshold: float = 0.1
    full_absorption_probe_cos_sim_threshold: float = 0.025
    probe_projection_proportion_threshold: float = 0.4
    absorption_fraction_max_absorbing_latents: int = 3
    lm_batch_size: int = 256
    seed: int = 42

    def __post_init__(self) -> None:
        if "{word}" not in self.prompt_template or "{letter}" not in self.prompt_template:
            raise ValueError(
                f"prompt_template={self.prompt_template!r} must contain {{word}} and {{letter}}"
            )
        check_ints(
            self,
            {
                "n_icl_examples": 0,
                "min_word_chars": 1,
                "min_tokens_per_letter": 4,
                "max_k_value": 1,
                "absorption_fraction_max_absorbing_latents": 1,
                "lm_batch_size": 1,
            },
        )
        if self.max_tokens_per_letter < self.min_tokens_per_letter:
            raise ValueError(
                f"max_tokens_per_letter={self.max_tokens_per_letter!r} must be >= "
                f"min_tokens_per_letter={self.min_tokens_per_letter}"
            )
        if not 0.1 <= self.test_fraction <= 0.9:
            raise ValueError(f"test_fraction={self.test_fraction!r} must lie in [0.1, 0.9]")
        check_in_range(
            self,
            (
                "f1_jump_threshold",
                "absorption_fraction_probe_cos_sim_threshold",
                "full_absorption_probe_cos_sim_threshold",
                "probe_projection_proportion_threshold",
            ),
            0.0,
            1.0,
        )
        if not self.probe_l2 > 0:
            raise ValueError(f"probe_l2={self.probe_l2!r} must be > 0")


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class _Words:
    token_ids: list[int]
    letters: list[int]  # index into _Words.alphabet
    is_test: list[bool]
    alphabet: list[str]
    icl_ids: list[int]


def _select_words(lm: LoadedLM, config: AbsorptionConfig) -> _Words:
    tokenizer = lm.tokenizer
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    by_letter: dict[str, list[int]] = {}
    for token_id, text in enumerate(vocab):
        if _WORD_RE.fullmatch(text) and len(text) - 1 >= config.min_word_chars:
            by_letter.setdefault(text[1].lower(), []).append(token_id)
    rng = np.random.default_rng(config.seed)
    pool = sorted(i for ids in by_letter.values() for i in ids)
    icl_ids = [pool[i] for i in rng.choice(len(pool), size=config.n_icl_examples, replace=False)]
    icl = set(icl_ids)
    alphabet = sorted(
        c
        for c, ids in by_letter.items()
        if len([i for i in ids if i not in icl]) >= config.min_tokens_per_letter
    )
    if len(alphabet) < 2:
        raise ValueError(
            f"{lm.name} has fewer than two letters with >= {config.min_tokens_per_letter} "
            "single-token words; lower min_tokens_per_letter"
        )
    words = _Words([], [], [], alphabet, icl_ids)
    for letter_index, letter in enumerate(alphabet):
        ids = [i for i in by_letter[letter] if i not in icl]
        ids = [ids[i] for i in rng.permutation(len(ids))[: config.max_tokens_per_letter]]
        n_test = max(2, round(len(ids) * config.test_fraction))
        for j, token_id in enumerate(ids):
            words.token_ids.append(token_id)
            words.letters.append(letter_index)
            words.is_test.append(j < n_test)
    return words


def _prefix_ids(lm: LoadedLM, config: AbsorptionConfig, icl_ids: list[int]) -> list[int]:
    tokenizer = lm.tokenizer
    lines = []
    for token_id in icl_ids:
        word = tokenizer.decode([token_id])
        lines.append(config.prompt_template.format(word=word, letter=word.strip()[0].upper()))
    # SAEBench prepends the separator to the first example too; the word follows a new line.
    text = "".join(f"\n{line}" for line in lines) + "\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


class _Captured(Exception):
    """Raised by the hook once block ``layer`` has run: the rest of the forward is not needed."""


@torch.no_grad()
def _word_activations(
    lm: LoadedLM, layer: int, prefix: list[int], word_ids: list[int], batch_size: int
) -> Tensor:
    """Residual stream after ``layer`` at each word appended to ``prefix``, [N, D]."""
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _args: tuple, output: Tensor | tuple) -> None:
        captured.append((output[0] if isinstance(output, tuple) else output)[:, -1].float().cpu())
        raise _Captured

    model, device = lm.model, lm.device
    prefix_1P = torch.tensor([prefix], device=device)
    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    # The prefix runs once, up to `layer` only: its cache then holds just the layers the words
    # need, so repeating it over a batch copies (layer + 1) / n_layers of the full cache.
    cache = DynamicCache(config=model.config) if DynamicCache is not None else None
    try:
        model(input_ids=prefix_1P, past_key_values=cache, use_cache=True)
    except _Captured:
        pass
    except Exception as e:  # a model without this cache type: run each prompt whole
        logger.info("no KV cache for %s (%s); running full prompts", lm.name, e)
        cache = None
    finally:
        handle.remove()
    captured.clear()
    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    try:
        for start in tqdm(range(0, len(word_ids), batch_size), desc="absorption: LM", leave=False):
            words_B1 = torch.tensor(word_ids[start : start + batch_size], device=device)[:, None]
            try:
                if cache is not None:
                    batch_cache = copy.deepcopy(cache)
                    batch_cache.batch_repeat_interleave(len(words_B1))
                    model(input_ids=words_B1, past_key_values=batch_cache, use_cache=True)
                else:
                    full_BT = torch.cat([prefix_1P.expand(len(words_B1), -1), words_B1], dim=1)
                    model(input_ids=full_BT, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return torch.cat(captured)


# ---------------------------------------------------------------------------------------------
# probes


def _fit_logistic(x: Tensor, y_CN: Tensor, l2: float, max_iter: int = 200) -> tuple[Tensor, Tensor]:
    """C independent class-balanced, L2-regularised logistic regressions (full-batch L-BFGS).

    ``x`` is [N, K] (inputs shared by all C heads) or [C, N, K]; it is standardised inside.
    Returns (weights [C, K], bias [C]) that apply to the raw inputs.
    """
    shared = x.dim() == 2
    mean_K = x.mean(-2, keepdim=True)
    std_K = x.std(-2, keepdim=True).clamp_min(1e-6)
    z = (x - mean_K) / std_K
    y = y_CN.float()
    n_pos_C1 = y.sum(1, keepdim=True).clamp_min(1)
    n_neg_C1 = (1 - y).sum(1, keepdim=True).clamp_min(1)
    weight_CN = y * (y.shape[1] / (2 * n_pos_C1)) + (1 - y) * (y.shape[1] / (2 * n_neg_C1))
    w_CK = torch.zeros(y.shape[0], x.shape[-1], requires_grad=True)
    b_C = torch.zeros(y.shape[0], requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w_CK, b_C], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        if shared:
            logits_CN = (z @ w_CK.T).T + b_C[:, None]
        else:
            logits_CN = torch.einsum("cnk,ck->cn", z, w_CK) + b_C[:, None]
        bce_CN = nn.functional.binary_cross_entropy_with_logits(logits_CN, y, reduction="none")
        loss = (weight_CN * bce_CN).mean(1).sum() + l2 * w_CK.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    # Undo the standardisation: w·(x - m)/s + b = (w/s)·x + (b - (w/s)·m).
    raw_w_CK = w_CK.detach() / std_K.squeeze(-2)
    bias_C = b_C.detach() - (raw_w_CK * mean_K.squeeze(-2)).sum(1)
    return raw_w_CK, bias_C


def _f1(predicted: Tensor, actual: Tensor) -> float:
    tp = float((predicted & actual).sum())
    fp = float((predicted & ~actual).sum())
    fn = float((~predicted & actual).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


# ---------------------------------------------------------------------------------------------
# eval


@torch.no_grad()
def compute(
    sae: SparseAutoencoder, lm: LoadedLM, layer: int, config: AbsorptionConfig
) -> EvalOutput:
    """First-letter feature absorption of ``sae`` (reading ``lm`` after block ``layer``).

    Raises:
        ValueError: ``layer`` out of range, an SAE whose d_in is not the LM's width, or a
            vocabulary with too few single-token words.
    """
    started = time.perf_counter()
    check_sae_fits(sae, lm, layer)
    words = _select_words(lm, config)
    prefix = _prefix_ids(lm, config, words.icl_ids)
    x_ND = _word_activations(lm, layer, prefix, words.token_ids, config.lm_batch_size)
    lm_s = time.perf_counter() - started

    was_training = sae.training
    sae.eval()
    try:
        param = sae.W_dec
        f_NF = torch.cat(
            [
                sae.encode(x_ND[i : i + 4096].to(param.device, param.dtype)).float().cpu()
                for i in range(0, len(x_ND), 4096)
            ]
        )
    finally:
        sae.train(was_training)
    W_dec_FD = sae.W_dec.detach().float().cpu()

    letters_N = torch.tensor(words.letters)
    test_N = torch.tensor(words.is_test)
    train_N = ~test_N
    n_letters = len(words.alphabet)
    y_CN = letters_N[None, :] == torch.arange(n_letters)[:, None]

    # 1. Probes on LM activations, one per letter.
    x_train = x_ND[train_N]
    probe_w_CD, probe_b_C = _fit_logistic(x_train, y_CN[:, train_N], config.probe_l2)
    probe_fires_CN = (x_ND @ probe_w_CD.T + probe_b_C).T > 0

    # 2. Main latents: rank by mean difference on the training words, grow k while F1 jumps.
    f_train = f_NF[train_N]
    y_train_CN = y_CN[:, train_N]
    pos_mean_CF = (y_train_CN.float() @ f_train) / y_train_CN.sum(1, keepdim=True)
    neg_mean_CF = ((~y_train_CN).float() @ f_train) / (~y_train_CN).sum(1, keepdim=True)
    max_k = min(config.max_k_value, f_NF.shape[1])  # a narrow SAE has fewer latents to try
    ranked_CK = (pos_mean_CF - neg_mean_CF).topk(max_k, dim=1).indices
    f1_CK = torch.zeros(n_letters, max_k)
    for k in tqdm(range(1, max_k + 1), desc="absorption: k-sparse", leave=False):
        index_CK = ranked_CK[:, :k]
        feats_CNK = f_NF.T[index_CK].permute(0, 2, 1)  # [C, N, k]
        w_CK, b_C = _fit_logistic(feats_CNK[:, train_N], y_train_CN, config.probe_l2)
        predicted_CN = torch.einsum("cnk,ck->cn", feats_CNK[:, test_N], w_CK) + b_C[:, None] > 0
        for c in range(n_letters):
            f1_CK[c, k - 1] = _f1(predicted_CN[c], y_CN[c, test_N])

    # 3. Absorption on the probe's true positives.
    details = []
    for c, letter in enumerate(words.alphabet):
        best, n_main = -math.inf, 0
        for k in range(max_k):
            if float(f1_CK[c, k]) > best + config.f1_jump_threshold:
                best, n_main = float(f1_CK[c, k]), k + 1
            else:
                break
        main = ranked_CK[c, :n_main]
        probe_dir_D = probe_w_CD[c] / probe_w_CD[c].norm().clamp_min(_EPS)
        dec_proj_F = W_dec_FD @ probe_dir_D  # d_i · p
        cos_F = dec_proj_F / W_dec_FD.norm(dim=1).clamp_min(_EPS)
        tp_N = y_CN[c] & test_N & probe_fires_CN[c]
        fractions, full = _absorption(
            x_ND[tp_N] @ probe_dir_D, f_NF[tp_N], dec_proj_F, cos_F, main, config
        )
        probe_test = _f1(probe_fires_CN[c, test_N], y_CN[c, test_N])
        details.append(
            {
                "first_letter": letter,
                "mean_absorption_fraction": float(np.mean(fractions)) if fractions else math.nan,
                "full_absorption_rate": float(np.mean(full)) if full else math.nan,
                "num_full_absorption": int(sum(full)),
                "num_probe_true_positives": int(tp_N.sum()),
                "num_split_features": n_main,
                "split_features": main.tolist(),
                "probe_test_f1": probe_test,
                "main_latents_test_f1": float(f1_CK[c, n_main - 1]),
                "k_sparse_test_f1": [round(float(v), 4) for v in f1_CK[c]],
            }
        )

    scored = [d for d in details if d["num_probe_true_positives"] > 0]
    if not scored:
        raise ValueError("no probe true positive for any letter; the probe failed to train")
    fraction = [d["mean_absorption_fraction"] for d in scored]
    full_rate = [d["full_absorption_rate"] for d in scored]
    n_split = [float(d["num_split_features"]) for d in scored]
    elapsed = time.perf_counter() - started
    logger.info(
        "absorption: fraction %.3f, full %.3f, split %.2f over %d letters (%d words, %.1fs)",
        np.mean(fraction),
        np.mean(full_rate),
        np.mean(n_split),
        len(scored),
        len(words.token_ids),
        elapsed,
    )

    def std(values: list[float]) -> float:
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    main_f1 = [d["main_latents_test_f1"] for d in details]
    return EvalOutput(
        metrics={
            "mean": {
                "mean_absorption_fraction_score": float(np.mean(fraction)),
                "mean_full_absorption_score": float(np.mean(full_rate)),
                "mean_num_split_features": float(np.mean(n_split)),
                "std_dev_absorption_fraction_score": std(fraction),
                "std_dev_full_absorption_score": std(full_rate),
                "std_dev_num_split_features": std(n_split),
            },
            # Absorption is only meaningful where the SAE has first-letter latents to absorb
            # from: an SAE without them (a random one) absorbs nothing and scores 0 above. How
            # well the main latents alone classify the letter says whether it has them.
            "first_letter_latents": {
                "mean_main_latents_test_f1": float(np.mean(main_f1)),
                "mean_probe_test_f1": float(np.mean([d["probe_test_f1"] for d in details])),
            },
        },
        details=details,
        unstructured={
            "n_words": len(words.token_ids),
            "n_test_words": int(test_N.sum()),
            "letters": words.alphabet,
            "letters_scored": [d["first_letter"] for d in scored],
            "icl_prefix": lm.tokenizer.decode(prefix),
            "seconds": {"lm": round(lm_s, 2), "total": round(elapsed, 2)},
        },
    )


def _absorption(
    act_proj_N: Tensor,
    f_NF: Tensor,
    dec_proj_F: Tensor,
    cos_F: Tensor,
    main: Tensor,
    config: AbsorptionConfig,
) -> tuple[list[float], list[bool]]:
    """SAEBench's absorption fraction and full-absorption flag for each probe true positive."""
    fractions: list[float] = []
    full: list[bool] = []
    is_main_F = torch.zeros_like(cos_F, dtype=torch.bool)
    is_main_F[main] = True
    absorber_F = ~is_main_F & (cos_F >= config.absorption_fraction_probe_cos_sim_threshold)
    k_abs = config.absorption_fraction_max_absorbing_latents
    share_NF = f_NF * dec_proj_F  # each latent's share of the reconstruction's projection
    for n in range(len(act_proj_N)):
        a = float(act_proj_N[n])
        share_F = share_NF[n]
        main_share = float(share_F[main].sum())
        candidates = share_F[absorber_F & (share_F > 0)]
        absorbed = float(candidates.topk(min(k_abs, len(candidates))).values.sum())
        threshold = config.probe_projection_proportion_threshold
        if main_share >= a or absorbed < threshold * a:
            fraction = 0.0
        elif main_share <= 0:
            fraction = 1.0
        else:
            absorbed = min(absorbed, a - main_share)
            fraction = float(np.clip(absorbed / (absorbed + main_share), 0.0, 1.0))
        fractions.append(fraction)
        top = int(share_F.argmax())
        full.append(
            bool(
                (f_NF[n, main].abs() < _EPS).all()
                and float(cos_F[top]) >= config.full_absorption_probe_cos_sim_threshold
                and a > 0
                and float(share_F[top]) >= threshold * a
            )
        )
    return fractions, full
