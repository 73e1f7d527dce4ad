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

1. A logistic probe "starts with c" (one-vs-rest, class-balanced, L2 on standardised inputs,
   scikit-learn) on the LM activations of the training words; its unit direction p_c in
   activation space.
2. Main latents by k-sparse probing, as SAEBench does (``main_latent_selection="k_sparse_probe"``):
   an L1-regularised, class-balanced logistic probe "starts with c" on all SAE latents of the
   training words ranks the latents by their (signed) weight; SAEBench's objective is the mean
   class-balanced BCE + ``k_sparse_probe_l1_decay`` (0.01) · ‖w‖₁, i.e. scikit-learn's
   ``C = 2 / (l1_decay · n_train)`` (liblinear). Latents the L1 probe leaves at weight 0 follow in
   mean-difference order (SAEBench's ``topk`` picks among zeros arbitrarily). For k = 1 ..
   ``max_k_value`` a logistic probe (scikit-learn, class-balanced, unregularised inputs as in
   SAEBench) on the top-k latents is scored by its test F1; k grows while the F1 rises by more
   than ``f1_jump_threshold`` (0.03). The kept top-k are the main (split) latents; their count is
   the letter's ``num_split_features``. ``main_latent_selection="mean_difference"`` ranks the
   latents by mean activation on c-words minus on the others instead (saeflow's rule before
   it followed SAEBench; cheaper, and blind to latents that fire on other letters too).
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
``mean_probe_test_f1`` (the LM probe's). The three headline means have 95% bootstrap intervals
over letters (``<metric>_ci_low`` / ``<metric>_ci_high``, ``scipy.stats.bootstrap``, BCa): the
letters are the sample, so two SAEs whose intervals overlap are not told apart. Per letter in
the details.

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
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

try:
    from transformers import DynamicCache
except ImportError:  # pragma: no cover - every supported transformers has it
    DynamicCache = None
import sklearn
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from evaluation.interpretability.schema import EvalOutput
from project.checks import check_in_range, check_ints
from project.hook_cache import check_sae_fits
from project.lm import LoadedLM, decoder_blocks
from project.saes.base import SparseAutoencoder
from project.statistics import bootstrap_interval

logger = logging.getLogger(__name__)

EVAL_TYPE_ID = "absorption_first_letter"
_EPS = 1e-8
_WORD_RE = re.compile(r" [A-Za-z]+")
MAIN_LATENT_SELECTIONS = ("k_sparse_probe", "mean_difference")
# A pure L1 penalty: scikit-learn 1.8 deprecated penalty="l1" for l1_ratio=1, which older
# versions ignore unless penalty="elasticnet" (they would silently fit an L2 probe).
_PURE_L1: dict[str, Any] = (
    {"l1_ratio": 1.0}
    if tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 8)
    else {"penalty": "l1"}
)


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
    main_latent_selection: str = "k_sparse_probe"
    k_sparse_probe_l1_decay: float = 0.01
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
        if not self.k_sparse_probe_l1_decay > 0:
            raise ValueError(
                f"k_sparse_probe_l1_decay={self.k_sparse_probe_l1_decay!r} must be > 0"
            )
        if self.main_latent_selection not in MAIN_LATENT_SELECTIONS:
            raise ValueError(
                f"main_latent_selection={self.main_latent_selection!r} is not one of "
                f"{', '.join(MAIN_LATENT_SELECTIONS)}"
            )


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


def _fit_probe(x_ND: np.ndarray, y_N: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """A class-balanced logistic probe with penalty ``l2`` · ‖w‖² on the standardised inputs
    (on top of the mean class-balanced BCE; scikit-learn's ``C = 1 / (2 · l2 · N)``).

    Returns (weights [D], bias) that apply to the raw inputs.
    """
    scaler = StandardScaler().fit(x_ND)
    probe = LogisticRegression(C=1.0 / (2 * l2 * len(x_ND)), class_weight="balanced", max_iter=1000)
    probe.fit(scaler.transform(x_ND), y_N)
    # Undo the standardisation: w·(x - m)/s + b = (w/s)·x + (b - (w/s)·m).
    raw_w = probe.coef_[0] / scaler.scale_
    return raw_w, float(probe.intercept_[0] - raw_w @ scaler.mean_)


def _rank_by_l1_probe(
    f_train: sparse.csr_matrix, y_N: np.ndarray, l1_decay: float, tie_order: np.ndarray, k: int
) -> np.ndarray:
    """The ``k`` latents with the largest weights of an L1-regularised, class-balanced logistic
    probe on all latents (SAEBench's candidate rule); zero-weight ties in ``tie_order``."""
    probe = LogisticRegression(
        **_PURE_L1,
        C=2.0 / (l1_decay * f_train.shape[0]),
        solver="liblinear",
        class_weight="balanced",
        max_iter=1000,
    )
    probe.fit(f_train, y_N)
    weights = probe.coef_[0]
    positive = np.flatnonzero(weights > 0)
    ranked = positive[np.argsort(-weights[positive], kind="stable")][:k]
    if len(ranked) < k:
        taken = set(ranked.tolist())
        rest = [i for i in tie_order[: k + len(ranked)].tolist() if i not in taken]
        ranked = np.concatenate([ranked, np.asarray(rest[: k - len(ranked)], dtype=np.int64)])
    return ranked


def _k_sparse_f1(
    f_NF: np.ndarray, y_N: np.ndarray, train_N: np.ndarray, ranked: np.ndarray
) -> list[float]:
    """Test F1 of SAEBench's k-sparse probes (scikit-learn, class-balanced, max_iter 500) on the
    first k of ``ranked``, for k = 1 .. len(ranked)."""
    test_N = ~train_N
    scores = []
    for k in range(1, len(ranked) + 1):
        feats = f_NF[:, ranked[:k]]
        if np.ptp(feats[train_N], axis=0).max() == 0:  # silent on every training word
            predicted = np.zeros(int(test_N.sum()), dtype=bool)
        else:
            probe = LogisticRegression(class_weight="balanced", max_iter=500)
            probe.fit(feats[train_N], y_N[train_N])
            predicted = probe.decision_function(feats[test_N]) > 0
        scores.append(float(f1_score(y_N[test_N], predicted, zero_division=0.0)))
    return scores


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
    train_np, y_np = train_N.numpy(), y_CN.numpy()
    x_np, f_np = x_ND.numpy().astype(np.float64), f_NF.numpy().astype(np.float64)

    # 1. Probes on LM activations, one per letter.
    probes = [
        _fit_probe(x_np[train_np], y_np[c, train_np], config.probe_l2)
        for c in tqdm(range(n_letters), desc="absorption: LM probes", leave=False)
    ]
    probe_w_CD = torch.tensor(np.stack([w for w, _ in probes]), dtype=torch.float32)
    probe_b_C = torch.tensor([b for _, b in probes], dtype=torch.float32)
    probe_fires_CN = (x_ND @ probe_w_CD.T + probe_b_C).T > 0

    # 2. Main latents: candidates ranked per letter, then k grows while the F1 jumps.
    f_train = f_NF[train_N]
    y_train_CN = y_CN[:, train_N]
    pos_mean_CF = (y_train_CN.float() @ f_train) / y_train_CN.sum(1, keepdim=True)
    neg_mean_CF = ((~y_train_CN).float() @ f_train) / (~y_train_CN).sum(1, keepdim=True)
    max_k = min(config.max_k_value, f_NF.shape[1])  # a narrow SAE has fewer latents to try
    mean_diff_CF = (pos_mean_CF - neg_mean_CF).numpy()
    f_train_csr = sparse.csr_matrix(f_np[train_np])
    ranked_CK, f1_CK = [], []
    for c in tqdm(range(n_letters), desc="absorption: k-sparse", leave=False):
        tie_order = np.argsort(-mean_diff_CF[c], kind="stable")
        if config.main_latent_selection == "k_sparse_probe":
            ranked = _rank_by_l1_probe(
                f_train_csr, y_np[c, train_np], config.k_sparse_probe_l1_decay, tie_order, max_k
            )
        else:
            ranked = tie_order[:max_k]
        ranked_CK.append(ranked)
        f1_CK.append(_k_sparse_f1(f_np, y_np[c], train_np, ranked))

    # 3. Absorption on the probe's true positives.
    details = []
    for c, letter in enumerate(words.alphabet):
        best, n_main = -math.inf, 0
        for k in range(max_k):
            if f1_CK[c][k] > best + config.f1_jump_threshold:
                best, n_main = f1_CK[c][k], k + 1
            else:
                break
        main = torch.from_numpy(ranked_CK[c][:n_main].copy())
        probe_dir_D = probe_w_CD[c] / probe_w_CD[c].norm().clamp_min(_EPS)
        dec_proj_F = W_dec_FD @ probe_dir_D  # d_i · p
        cos_F = dec_proj_F / W_dec_FD.norm(dim=1).clamp_min(_EPS)
        tp_N = y_CN[c] & test_N & probe_fires_CN[c]
        fractions, full = _absorption(
            x_ND[tp_N] @ probe_dir_D, f_NF[tp_N], dec_proj_F, cos_F, main, config
        )
        probe_test = float(
            f1_score(y_np[c, ~train_np], probe_fires_CN[c, test_N].numpy(), zero_division=0.0)
        )
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
                "main_latents_test_f1": f1_CK[c][n_main - 1],
                "k_sparse_test_f1": [round(v, 4) for v in f1_CK[c]],
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

    def with_interval(name: str, values: list[float]) -> dict[str, float]:
        low, high = bootstrap_interval(values, config.seed)
        return {name: float(np.mean(values)), f"{name}_ci_low": low, f"{name}_ci_high": high}

    main_f1 = [d["main_latents_test_f1"] for d in details]
    return EvalOutput(
        metrics={
            "mean": {
                **with_interval("mean_absorption_fraction_score", fraction),
                **with_interval("mean_full_absorption_score", full_rate),
                "mean_num_split_features": float(np.mean(n_split)),
                "std_dev_absorption_fraction_score": std(fraction),
                "std_dev_full_absorption_score": std(full_rate),
                "std_dev_num_split_features": std(n_split),
            },
            # Absorption is only meaningful where the SAE has first-letter latents to absorb
            # from: an SAE without them (a random one) absorbs nothing and scores 0 above. How
            # well the main latents alone classify the letter says whether it has them.
            "first_letter_latents": {
                **with_interval("mean_main_latents_test_f1", main_f1),
                "mean_probe_test_f1": float(np.mean([d["probe_test_f1"] for d in details])),
            },
        },
        details=details,
        unstructured={
            "n_words": len(words.token_ids),
            "n_test_words": int(test_N.sum()),
            "letters": words.alphabet,
            "letters_scored": [d["first_letter"] for d in scored],
            "main_latent_selection": config.main_latent_selection,
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
