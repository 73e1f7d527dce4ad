"""Per-latent selection scores of one SAE (METHODS.md §4), for every latent, batched.

Output score and Delta Token Confidence (DTC) read the next-token distribution at the end of
the neutral prefix, once clean and once with latent i intervened on. The batched path starts
from the prefix's hook activation (cached in a :class:`~project.hook_cache.HookCache`),
puts latents along the batch dimension and runs only the blocks after the hook
(:func:`~project.hook_cache.logits_from_hook`); the clean pass runs once. The direct path
(:func:`direct_scores`, the reference the tests and ``bench/bench_selection.py`` compare with)
runs one clean and one intervened full forward per latent, encoding the live hidden state in a
hook, and must agree to 1e-4.

Definitions (c_i the DTC reference coefficient, see :class:`SelectionConfig`):

- ``output_score`` (Arad et al.): at the last prefix position latent i gets ``s · max_j f_j``
  added, the SAE error kept; over ℓ(i), ``P = (1 − min_rank/|V|) · max_prob`` (rank 0 = the
  most likely token); ``S_out = P_intervened − P_clean``.
- ``dtc_in_place``: latent i's code set to ``α c_i`` in the reconstruction, error kept;
  ``dtc_decoded_alone``: the residual replaced by ``decode(α c_i e_i)``; both
  ``ΔC_k = C_k(p_intervened) − C_k(p_clean)``, ``C_k(p) = −(1/k) Σ_{top-k} log p_j``.
- ``input_score`` (Arad et al.): of latent i's top-activating held-out examples (the first
  100; NaN below 10), the share whose max-activation token is in ℓ(i).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from evaluation.selection.config import SelectionConfig
from project.corpus import eval_windows
from project.hook_cache import (
    HookCache,
    _blocks_return_tuple,
    _HandOn,
    check_sae_fits,
    logits_from_hook,
)
from project.lm import LoadedLM, decoder_blocks, residual_activations, splice_residual
from project.logit_lens import decoder_lens_tokens
from project.saes import SparseAutoencoder

logger = logging.getLogger(__name__)

INTERVENED_SCORES = ("output_score", "dtc_in_place", "dtc_decoded_alone")


# ---------------------------------------------------------------------------------------------
# next-token statistics


def token_confidence(logits_BV: Tensor, k: int) -> Tensor:
    """``C_k(p) = −(1/k) Σ_{j ∈ top-k(p)} log p_j`` per row, as ``logsumexp − mean top-k
    logit``: log p is the logit less one constant per row, so no [B, |V|] log-softmax is
    written (float64, as the log-softmax was)."""
    top_Bk = logits_BV.topk(k, dim=-1).values.double()
    return torch.logsumexp(logits_BV.double(), dim=-1) - top_Bk.mean(dim=-1)


def lens_probability(logits_BV: Tensor, lens_BL: Tensor) -> Tensor:
    """Arad et al.'s ``P = (1 − min_rank/|V|) · max_prob`` over the tokens ``lens_BL``.

    The lens token of largest logit has both the smallest rank (tokens strictly more likely
    than it) and the largest probability, ``exp(logit − logsumexp)`` (float64).
    """
    best_B1 = logits_BV.gather(1, lens_BL).max(dim=-1, keepdim=True).values
    rank_B = (logits_BV > best_B1).sum(dim=-1).double()
    log_z_B = torch.logsumexp(logits_BV.double(), dim=-1)
    prob_B = (best_B1[:, 0].double() - log_z_B).exp()
    return (1 - rank_B / logits_BV.shape[-1]) * prob_B


def clean_lens_probability(logits_V: Tensor, lens_BL: Tensor) -> Tensor:
    """:func:`lens_probability` of one row of logits for each of B lens sets, without
    repeating the row B times: ranks by binary search in the sorted logits."""
    sorted_V = logits_V.sort().values
    best_B = logits_V[lens_BL].max(dim=-1).values
    above_B = len(sorted_V) - torch.searchsorted(sorted_V, best_B, right=True)
    prob_B = (best_B.double() - torch.logsumexp(logits_V.double(), dim=-1)).exp()
    return (1 - above_B.double() / len(sorted_V)) * prob_B


# ---------------------------------------------------------------------------------------------
# the prefix


@dataclass
class PrefixState:
    """The neutral prefix at the hook: tokens, activation, latents, clean next-token logits."""

    ids_1T: Tensor
    x_TD: Tensor
    f_TF: Tensor
    clean_logits_V: Tensor

    @property
    def last_max_activation(self) -> float:
        """``max_j f_j`` at the last position: the output score's unit."""
        return float(self.f_TF[-1].max())


@torch.no_grad()
def prefix_state(
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    prefix: str,
    hook_cache: HookCache | None = None,
) -> PrefixState:
    """Hook activation of ``prefix`` (from ``hook_cache``), its latents and clean logits."""
    ids_1T = lm.tokenizer(prefix, return_tensors="pt").input_ids
    if ids_1T.shape[1] == 0:
        raise ValueError(f"prefix {prefix!r} tokenizes to nothing")
    cache = hook_cache if hook_cache is not None else HookCache()
    x_TD = cache.activations(lm, layer, ids_1T, desc="prefix")[0].float()
    f_TF = sae.encode(x_TD.to(sae.W_dec.dtype)).float()
    clean_V = logits_from_hook(lm, layer, ids_1T, x_TD[None])[0, -1]
    return PrefixState(ids_1T, x_TD, f_TF, clean_V)


def dtc_coefficients(
    config: SelectionConfig, state: PrefixState, max_activation_F: Tensor | None
) -> Tensor:
    """c_i per position ([T, F]): m_i everywhere, or the latent's own prefix activation."""
    if config.dtc_reference == "prefix":
        return state.f_TF
    if max_activation_F is None:
        raise ValueError("dtc_reference='max_activation' needs the latents' max activations")
    return max_activation_F.float()[None, :].expand_as(state.f_TF)


def _positions(config: SelectionConfig, T: int) -> Tensor:
    return torch.arange(T) if config.dtc_positions == "all" else torch.tensor([T - 1])


class _LastPosition:
    """Next-token logits when only the prefix's last position changes at the hook.

    Every earlier position is the clean prefix for every latent, so the LM runs on it once
    (``use_cache``) and each batch runs the last position alone against that KV cache, the
    blocks up to the hook handing on the given hidden state (the stubs of
    :func:`~project.hook_cache.logits_from_hook`). Their cache entries stay at T − 1
    positions, which is what sets the last position's index, mask and rotary angle right.
    """

    def __init__(self, lm: LoadedLM, layer: int, ids_1T: Tensor) -> None:
        self.lm, self.layer = lm, layer
        self.ids_1T = ids_1T.to(lm.device)
        with torch.inference_mode():
            out = lm.model(input_ids=self.ids_1T[:, :-1], use_cache=True)
        self.cache: Any = out.past_key_values

    def logits(self, hidden_BD: Tensor) -> Tensor:
        lm, layer = self.lm, self.layer
        B = hidden_BD.shape[0]
        blocks = decoder_blocks(lm.model)
        as_tuple = _blocks_return_tuple(lm)
        dtype = next(lm.model.parameters()).dtype
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(B)
        originals = [blocks[i] for i in range(layer + 1)]
        try:
            for i in range(layer):
                blocks[i] = _HandOn(originals[i], None, as_tuple)
            blocks[layer] = _HandOn(
                originals[layer], hidden_BD[:, None].to(lm.device, dtype), as_tuple
            )
            with torch.inference_mode():
                out = lm.model(
                    input_ids=self.ids_1T[:, -1:].expand(B, 1),
                    past_key_values=cache,
                    use_cache=True,
                )
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block
        return out.logits[:, -1].float()


# ---------------------------------------------------------------------------------------------
# batched path


@torch.no_grad()
def intervened_scores(
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    config: SelectionConfig,
    *,
    latents: Tensor | None = None,
    max_activation_F: Tensor | None = None,
    lens_FL: Tensor | None = None,
    hook_cache: HookCache | None = None,
    progress: bool = True,
    scores: Sequence[str] = INTERVENED_SCORES,
) -> dict[str, Tensor]:
    """``output_score``, ``dtc_in_place`` and ``dtc_decoded_alone`` (float64, one value per
    entry of ``latents``, default all), batched over latents from the cached prefix; ``scores``
    names the ones to compute (each is its own intervened pass per latent: a caller that needs
    one pays for one)."""
    unknown = [name for name in scores if name not in INTERVENED_SCORES]
    if unknown or not scores:
        raise ValueError(f"scores={list(scores)!r}; valid: {', '.join(INTERVENED_SCORES)}")
    check_sae_fits(sae, lm, layer)
    F = sae.cfg.d_sae
    latents = torch.arange(F) if latents is None else torch.as_tensor(latents).long()
    if lens_FL is None and "output_score" in scores:
        # Only the output score reads ℓ(i); the lens is a [F, |V|] product, so DTC skips it.
        lens_FL = decoder_lens_tokens(lm, sae.W_dec, config.lens_tokens)
    state = prefix_state(sae, lm, layer, config.prefix, hook_cache)
    T = state.x_TD.shape[0]
    W_dec_FD = sae.W_dec.detach().float()
    b_dec_D = sae.b_dec.detach().float()
    coef_TF = dtc_coefficients(config, state, max_activation_F)
    pos_P = _positions(config, T)
    s_max = config.output_scale * state.last_max_activation
    out = {name: torch.empty(len(latents), dtype=torch.float64) for name in scores}
    ids_1T = state.ids_1T
    # Interventions only at the last position (the output score's, and DTC's by default) need
    # only that position past the hook; "all" positions run the whole prefix per latent.
    last = _LastPosition(lm, layer, ids_1T) if T > 1 else None

    def run(h_BTD: Tensor, only_last: bool) -> Tensor:
        if only_last and last is not None:
            return last.logits(h_BTD[:, -1])
        return logits_from_hook(lm, layer, ids_1T.expand(len(h_BTD), -1), h_BTD)[:, -1]

    dtc_last = config.dtc_positions == "last"
    # The clean reference runs the same path as the intervened passes, so a no-op
    # intervention scores exactly 0.
    clean_last_V = run(state.x_TD[None], only_last=True)[0]
    clean_P_logits_V = clean_last_V
    clean_C = token_confidence(
        (clean_last_V if dtc_last else state.clean_logits_V)[None], config.k
    )[0]
    chunks = latents.split(config.batch_latents)
    for start, chunk_B in zip(
        range(0, len(latents), config.batch_latents),
        tqdm(chunks, desc="selection scores", leave=False, disable=not progress),
        strict=True,
    ):
        B = len(chunk_B)
        rows_BD = W_dec_FD[chunk_B]
        if lens_FL is not None and "output_score" in out:
            lens_BL = lens_FL[chunk_B]
            clean_P = clean_lens_probability(clean_P_logits_V, lens_BL)
            # Output score: latent i + s·max_j f_j at the last position, the error term kept.
            h_BTD = state.x_TD.expand(B, -1, -1).clone()
            h_BTD[:, -1] += s_max * rows_BD
            logits_BV = run(h_BTD, only_last=True)
            out["output_score"][start : start + B] = lens_probability(logits_BV, lens_BL) - clean_P
        target_BP = config.alpha * coef_TF[pos_P][:, chunk_B].T
        if "dtc_in_place" in out:
            # DTC in place: code of latent i becomes α c_i, everything else (error too) kept.
            delta_BP = target_BP - state.f_TF[pos_P][:, chunk_B].T
            h_BTD = state.x_TD.expand(B, -1, -1).clone()
            h_BTD[:, pos_P] += delta_BP[..., None] * rows_BD[:, None, :]
            logits_BV = run(h_BTD, only_last=dtc_last)
            out["dtc_in_place"][start : start + B] = token_confidence(logits_BV, config.k) - clean_C
        if "dtc_decoded_alone" in out:
            # DTC decoded alone: the residual is decode(α c_i e_i), all other codes zero.
            h_BTD = state.x_TD.expand(B, -1, -1).clone()
            h_BTD[:, pos_P] = target_BP[..., None] * rows_BD[:, None, :] + b_dec_D
            logits_BV = run(h_BTD, only_last=dtc_last)
            out["dtc_decoded_alone"][start : start + B] = (
                token_confidence(logits_BV, config.k) - clean_C
            )
    return out


# ---------------------------------------------------------------------------------------------
# direct path (reference)


@torch.no_grad()
def direct_scores(
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    config: SelectionConfig,
    latents: Tensor,
    *,
    max_activation_F: Tensor | None = None,
    lens_FL: Tensor | None = None,
) -> dict[str, Tensor]:
    """The same three scores with one clean and one intervened full forward per latent and
    score, no batching, no cache: the SAE encodes the live hidden state inside the hook and
    the intervened reconstruction (plus the error, where kept) replaces it."""
    check_sae_fits(sae, lm, layer)
    if lens_FL is None:
        lens_FL = decoder_lens_tokens(lm, sae.W_dec, config.lens_tokens)
    ids_1T = lm.tokenizer(config.prefix, return_tensors="pt").input_ids.to(lm.device)
    T = ids_1T.shape[1]
    pos_P = _positions(config, T)
    dtype = sae.W_dec.dtype
    m_F = None if max_activation_F is None else max_activation_F.to(dtype)

    def forward(edit: object | None) -> Tensor:
        if edit is None:
            return lm.model(input_ids=ids_1T, use_cache=False).logits[0, -1].float()
        with splice_residual(lm, layer, edit):  # type: ignore[arg-type]
            return lm.model(input_ids=ids_1T, use_cache=False).logits[0, -1].float()

    def edit_for(kind: str, i: int) -> object:
        def edit(h_BTD: Tensor) -> Tensor:
            x_TD = h_BTD[0].to(dtype)
            f_TF = sae.encode(x_TD)
            error_TD = x_TD - sae.decode(f_TF)
            g_TF = f_TF.clone()
            if kind == "output_score":
                g_TF[-1, i] += config.output_scale * f_TF[-1].max()
                new_TD = sae.decode(g_TF) + error_TD
            else:
                if config.dtc_reference == "prefix":
                    coef_P = f_TF[pos_P, i]
                else:
                    if m_F is None:
                        raise ValueError("dtc_reference='max_activation' needs max activations")
                    coef_P = m_F[i].expand(len(pos_P))
                new_TD = x_TD.clone()
                if kind == "dtc_in_place":
                    g_TF[pos_P, i] = config.alpha * coef_P
                    new_TD[pos_P] = (sae.decode(g_TF) + error_TD)[pos_P]
                else:
                    alone_PF = torch.zeros(len(pos_P), f_TF.shape[1], dtype=dtype)
                    alone_PF[:, i] = config.alpha * coef_P
                    new_TD[pos_P] = sae.decode(alone_PF)
            return new_TD[None].to(h_BTD.dtype)

        return edit

    latents = torch.as_tensor(latents).long()
    out = {name: torch.empty(len(latents), dtype=torch.float64) for name in INTERVENED_SCORES}
    for n, i in enumerate(latents.tolist()):
        lens_1L = lens_FL[i][None]
        for kind in INTERVENED_SCORES:
            clean_V = forward(None)[None]
            hit_V = forward(edit_for(kind, i))[None]
            if kind == "output_score":
                value = lens_probability(hit_V, lens_1L) - lens_probability(clean_V, lens_1L)
            else:
                value = token_confidence(hit_V, config.k) - token_confidence(clean_V, config.k)
            out[kind][n] = value[0]
    return out


# ---------------------------------------------------------------------------------------------
# held-out scan: max activation, frequency, input score


@torch.no_grad()
def scan_latents(
    sae: SparseAutoencoder, lm: LoadedLM, layer: int, config: SelectionConfig
) -> dict[str, Tensor]:
    """One pass over held-out text: ``max_activation`` [F], ``firing_frequency`` [F] (share of
    counted tokens where the latent is > 0; BOS/EOS/pad never count, as in the steering
    table) and per example (``example_tokens`` tokens) each latent's max ``example_max_EF`` and
    the token at that max ``example_token_EF``."""
    check_sae_fits(sae, lm, layer)
    ids_WT = eval_windows(
        config.corpus,
        lm.tokenizer,
        config.context_size,
        config.n_tokens,
        text_column=config.text_column,
    )
    tok = lm.tokenizer
    special = {t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None}
    F, E_len = sae.cfg.d_sae, config.example_tokens
    max_F = torch.zeros(F)
    fired_F = torch.zeros(F, dtype=torch.long)
    ex_max: list[Tensor] = []
    ex_tok: list[Tensor] = []
    counted = 0
    for start in tqdm(range(0, len(ids_WT), config.lm_batch_size), desc="scan", leave=False):
        ids_BT = ids_WT[start : start + config.lm_batch_size]
        keep_BT = torch.ones_like(ids_BT, dtype=torch.bool)
        for t in special:
            keep_BT &= ids_BT != t
        acts_BTD = residual_activations(lm, ids_BT, layer).float().cpu()
        B, T, _ = acts_BTD.shape
        f_NF = sae.encode(acts_BTD.reshape(B * T, -1).to(sae.W_dec.dtype)).float()
        f_NF = f_NF.masked_fill(~keep_BT.reshape(-1, 1), 0.0)
        max_F = torch.maximum(max_F, f_NF.max(dim=0).values)
        fired_F += (f_NF > 0).sum(dim=0)
        counted += int(keep_BT.sum())
        # Cut every window into examples of E_len tokens (the tail example may be shorter).
        f_BTF = f_NF.reshape(B, T, F)
        for s in range(0, T, E_len):
            vals_BF, arg_BF = f_BTF[:, s : s + E_len].max(dim=1)
            ex_max.append(vals_BF)
            ex_tok.append(ids_BT[:, s : s + E_len].gather(1, arg_BF))
    return {
        "max_activation": max_F,
        "firing_frequency": fired_F.float() / max(counted, 1),
        "n_tokens": torch.tensor(counted),
        "example_max_EF": torch.cat(ex_max),
        "example_token_EF": torch.cat(ex_tok),
    }


def input_scores(
    example_max_EF: Tensor,
    example_token_EF: Tensor,
    lens_FL: Tensor,
    n_examples: int = 100,
    min_examples: int = 10,
) -> Tensor:
    """Share of each latent's top-activating examples (the first ``n_examples`` where it
    fires, by max activation) whose max-activation token is one of its lens tokens; NaN for
    latents that fire in fewer than ``min_examples`` examples."""
    E, F = example_max_EF.shape
    top = min(n_examples, E)
    vals_KF, idx_KF = example_max_EF.topk(top, dim=0)
    toks_KF = example_token_EF.gather(0, idx_KF)
    valid_KF = vals_KF > 0
    hit_KF = torch.zeros_like(valid_KF)
    for chunk in range(0, F, 2048):  # [K, chunk, L] comparisons, bounded memory
        sl = slice(chunk, chunk + 2048)
        hit_KF[:, sl] = (toks_KF[:, sl, None] == lens_FL[None, sl, :]).any(dim=-1)
    n_F = valid_KF.sum(dim=0)
    score_F = (hit_KF & valid_KF).sum(dim=0).double() / n_F.clamp_min(1)
    return torch.where(n_F >= min_examples, score_F, torch.full_like(score_F, float("nan")))


# ---------------------------------------------------------------------------------------------
# all scores


@torch.no_grad()
def compute_scores(
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    config: SelectionConfig | None = None,
    *,
    latent_stats: dict[str, Tensor] | None = None,
    hook_cache: HookCache | None = None,
) -> dict[str, Tensor]:
    """Every per-latent score of ``sae``: ``max_activation``, ``firing_frequency``,
    ``input_score``, ``output_score``, ``dtc_in_place``, ``dtc_decoded_alone`` ([F] each) and
    ``lens_FL`` (the logit-lens tokens). ``latent_stats`` (the steering table:
    ``max_activation``, ``firing_frequency``) replaces the scan's own figures when given."""
    config = config or SelectionConfig()
    check_sae_fits(sae, lm, layer)
    was_training = sae.training
    sae.eval()
    try:
        started = time.perf_counter()
        lens_FL = decoder_lens_tokens(lm, sae.W_dec, config.lens_tokens)
        scan = scan_latents(sae, lm, layer, config)
        stats = latent_stats or scan
        max_F = stats["max_activation"].float()
        scanned = time.perf_counter()
        intervened = intervened_scores(
            sae, lm, layer, config, max_activation_F=max_F, lens_FL=lens_FL, hook_cache=hook_cache
        )
        logger.info(
            "selection scores of %d latents: scan %.1fs, intervened passes %.1fs",
            sae.cfg.d_sae,
            scanned - started,
            time.perf_counter() - scanned,
        )
    finally:
        sae.train(was_training)
    return {
        "max_activation": max_F,
        "firing_frequency": stats["firing_frequency"].float(),
        "input_score": input_scores(
            scan["example_max_EF"],
            scan["example_token_EF"],
            lens_FL,
            config.input_examples,
            config.input_min_examples,
        ),
        **intervened,
        "lens_FL": lens_FL,
    }
