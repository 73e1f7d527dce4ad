"""Trained adapters applied per row, so one generation batch mixes prompts of different
concepts' adapters (and unsteered prompts) the way the steering protocol batches its rows.

- LoRA: a forward hook on the adapted module (``o_proj``) of each layer adds
  ``scaling · B_r A_r x`` for row r, at every position of every forward pass (prompt and every
  decode step), as the ``peft``-wrapped model would;
- LoReFT: a hook on each layer's block output applies ``h + R_rᵀ(W_r h + b_r − R_r h)`` at the
  row's first and last five prompt positions, counted over its real prompt tokens (left
  padding skipped), in the prefill only: decode steps under the KV cache are left alone
  (AxBench does not intervene on generated tokens). Without the cache every pass recomputes
  the prompt, so every pass is edited there, which gives the same tokens.

A row whose adapter lacks a layer (or has none) gets zero weights there, an exact no-op.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager

import torch
from torch import Tensor, nn

from evaluation.steering.trained.config import (
    LOREFT_FIRST,
    LOREFT_LAST,
    TrainedAdapter,
    check_layers,
    lora_target,
)
from evaluation.steering.trained.data import (
    IGNORE,
    check_pairs,
    collate,
    response_token_loss,
    tokenize_pair,
)
from project.generation import (
    BatchContext,
    GenerationBatch,
    GenerationConfig,
    generate_token_ids,
)
from project.lm import LoadedLM, decoder_blocks, splice_residual


def prompt_positions(starts_B: Tensor, ends_B: Tensor, width: int) -> Tensor:
    """[B, width] bool: LoReFT's positions, the first :data:`LOREFT_FIRST` and the last
    :data:`LOREFT_LAST` of each row's prompt columns ``[starts_B[b], ends_B[b])`` (all of a
    prompt shorter than their sum)."""
    col_BW = torch.arange(width)[None, :]
    start_B1, end_B1 = starts_B[:, None], ends_B[:, None]
    inside = (col_BW >= start_B1) & (col_BW < end_B1)
    first = col_BW < start_B1 + LOREFT_FIRST
    last = col_BW >= end_B1 - LOREFT_LAST
    return inside & (first | last)


def loreft_edit(h_BTD: Tensor, R_BRD: Tensor, W_BRD: Tensor, b_BR: Tensor, at_BT: Tensor) -> Tensor:
    """``h + Rᵀ(Wh + b − Rh)`` where ``at_BT``, ``h`` elsewhere (the batch dimension of the
    weights may be 1: one intervention for every row)."""
    dtype = h_BTD.dtype
    R_BRD, W_BRD, b_BR = (t.to(dtype) for t in (R_BRD, W_BRD, b_BR))
    # Wh + b and Rh apart (not (W − R)h): W = R then cancels exactly, an exact no-op.
    delta_BTR = (h_BTD @ W_BRD.transpose(-1, -2) + b_BR[:, None, :]) - h_BTD @ R_BRD.transpose(
        -1, -2
    )
    return h_BTD + at_BT[..., None].to(dtype) * (delta_BTR @ R_BRD)


class _Stacked:
    """The adapters of a prompt list, stacked per layer over the distinct adapters (index 0:
    zeros, for prompts without one or without that layer), so a batch gathers its rows'."""

    def __init__(self, lm: LoadedLM, adapters: Sequence[TrainedAdapter | None]) -> None:
        distinct: dict[int, TrainedAdapter] = {}
        for adapter in adapters:
            if adapter is not None:
                distinct.setdefault(id(adapter), adapter)
        for adapter in distinct.values():
            check_adapter(lm, adapter)
        slot = {key: u + 1 for u, key in enumerate(distinct)}
        self.index_N = torch.tensor([0 if a is None else slot[id(a)] for a in adapters])
        U = len(distinct) + 1
        # layer -> (module name, A [U, r, d_in], B [U, d_out, r], scaling [U])
        self.lora: dict[int, tuple[str, Tensor, Tensor, Tensor]] = {}
        # layer -> (R [U, r, D], W [U, r, D], b [U, r], active [U])
        self.loreft: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        items = list(distinct.values())
        for layer in sorted({layer for a in items for layer in a.layers}):
            loras = [(u + 1, a) for u, a in enumerate(items) if a.method == "lora"]
            lora_here = [(u, a) for u, a in loras if layer in a.layers]
            if lora_here:
                rank = max(a.lora(layer)[0].shape[0] for _, a in lora_here)
                A0, B0 = lora_here[0][1].lora(layer)
                A_URI = torch.zeros(U, rank, A0.shape[1])
                B_UOR = torch.zeros(U, B0.shape[0], rank)
                s_U = torch.zeros(U)
                for u, a in lora_here:
                    A, B = a.lora(layer)
                    A_URI[u, : A.shape[0]] = A
                    B_UOR[u, :, : B.shape[1]] = B
                    s_U[u] = a.scaling
                self.lora[layer] = (lora_target(lm, layer), A_URI, B_UOR, s_U)
            refts = [(u + 1, a) for u, a in enumerate(items) if a.method == "loreft"]
            reft_here = [(u, a) for u, a in refts if layer in a.layers]
            if reft_here:
                rank = max(a.loreft(layer)[0].shape[0] for _, a in reft_here)
                R_URD = torch.zeros(U, rank, lm.d_model)
                W_URD = torch.zeros(U, rank, lm.d_model)
                b_UR = torch.zeros(U, rank)
                active_U = torch.zeros(U, dtype=torch.bool)
                for u, a in reft_here:
                    R, W, b = a.loreft(layer)
                    R_URD[u, : R.shape[0]] = R
                    W_URD[u, : W.shape[0]] = W
                    b_UR[u, : b.shape[0]] = b
                    active_U[u] = True
                self.loreft[layer] = (R_URD, W_URD, b_UR, active_U)

    @contextmanager
    def hooks(
        self,
        lm: LoadedLM,
        rows_B: Tensor,
        starts_B: Tensor,
        ends_B: Tensor,
        width: int,
        prefill_only: bool,
    ) -> Iterator[None]:
        """While active: the adapters of prompts ``rows_B`` applied to the batch's rows, whose
        prompts fill columns ``[starts_B, ends_B)`` of the first ``width``; LoReFT edits the
        first pass only when ``prefill_only`` (later passes are decode steps under the cache),
        else every pass (each starts again at column 0)."""
        u_B = self.index_N[rows_B.cpu()]
        device = lm.device
        with ExitStack() as stack:
            blocks = decoder_blocks(lm.model)
            for layer, (name, A_URI, B_UOR, s_U) in self.lora.items():
                A_BRI, B_BOR = A_URI[u_B].to(device), B_UOR[u_B].to(device)
                s_B = s_U[u_B].to(device)

                def add_lora(
                    _module: nn.Module,
                    args: tuple,
                    output: Tensor,
                    A_BRI: Tensor = A_BRI,
                    B_BOR: Tensor = B_BOR,
                    s_B: Tensor = s_B,
                ) -> Tensor:
                    x_BTI = args[0]
                    low_BTR = x_BTI @ A_BRI.transpose(-1, -2).to(x_BTI.dtype)
                    out_BTO = low_BTR @ B_BOR.transpose(-1, -2).to(x_BTI.dtype)
                    return output + out_BTO * s_B[:, None, None].to(x_BTI.dtype)

                handle = blocks[layer].get_submodule(name).register_forward_hook(add_lora)
                stack.callback(handle.remove)
            at_BW = prompt_positions(starts_B.cpu(), ends_B.cpu(), width)
            for layer, (R_URD, W_URD, b_UR, active_U) in self.loreft.items():
                R_BRD, W_BRD, b_BR = (t[u_B].to(device) for t in (R_URD, W_URD, b_UR))
                at_here_BW = (at_BW & active_U[u_B][:, None]).to(device)
                passes = [0]

                def edit(
                    h_BTD: Tensor,
                    R_BRD: Tensor = R_BRD,
                    W_BRD: Tensor = W_BRD,
                    b_BR: Tensor = b_BR,
                    at_BW: Tensor = at_here_BW,
                    passes: list[int] = passes,
                ) -> Tensor:
                    passes[0] += 1
                    if prefill_only and passes[0] > 1:
                        return h_BTD
                    T = h_BTD.shape[1]
                    at_BT = at_BW[:, :T]
                    generated = T - width  # > 0 in an uncached pass: not prompt columns
                    if generated > 0:
                        at_BT = torch.cat([at_BW, at_BW.new_zeros(len(at_BW), generated)], 1)
                    return loreft_edit(h_BTD, R_BRD, W_BRD, b_BR, at_BT)

                stack.enter_context(splice_residual(lm, layer, edit))
            yield


def check_adapter(lm: LoadedLM, adapter: TrainedAdapter) -> None:
    """Raise ValueError unless ``adapter`` fits ``lm`` (its layers and widths)."""
    if adapter.d_model != lm.d_model:
        raise ValueError(
            f"the adapter was trained on a d_model {adapter.d_model} LM ({adapter.lm_name}), "
            f"not {lm.name}'s {lm.d_model}"
        )
    check_layers(adapter.config, lm.n_layers)
    if adapter.method == "lora":
        for layer in adapter.layers:
            if lora_target(lm, layer) != adapter.target:
                raise ValueError(f"the adapter's module {adapter.target!r} is not {lm.name}'s")


def adapter_batch_context(lm: LoadedLM, adapters: Sequence[TrainedAdapter | None]) -> BatchContext:
    """A ``batch_context`` for :func:`project.generation.generate_token_ids`: prompt i is
    steered by ``adapters[i]`` (None: unsteered). Checks every adapter against ``lm`` now."""
    stacked = _Stacked(lm, adapters)

    def context(batch: GenerationBatch) -> AbstractContextManager[None]:
        ends_B = torch.full_like(batch.starts_B, batch.width)
        return stacked.hooks(
            lm, batch.rows_B, batch.starts_B, ends_B, batch.width, prefill_only=batch.use_cache
        )

    return context


def generate_token_ids_with_adapters(
    lm: LoadedLM,
    prompts: Sequence[str],
    adapters: Sequence[TrainedAdapter | None],
    config: GenerationConfig | None = None,
    *,
    seeds: Sequence[int] | None = None,
    progress: str | None = None,
) -> list[list[int]]:
    """:func:`project.generation.generate_token_ids` with prompt i steered by ``adapters[i]``
    (None: unsteered); one batch mixes adapters. ``seeds``: per-prompt sampling seeds (a
    factor-less method samples each factor row with its own)."""
    if len(adapters) != len(prompts):
        raise ValueError(f"{len(adapters)} adapters for {len(prompts)} prompts")
    return generate_token_ids(
        lm,
        prompts,
        config,
        seeds=seeds,
        progress=progress,
        batch_context=adapter_batch_context(lm, adapters),
    )


def generate_with_adapters(
    lm: LoadedLM,
    prompts: Sequence[str],
    adapters: Sequence[TrainedAdapter | None],
    config: GenerationConfig | None = None,
    *,
    seeds: Sequence[int] | None = None,
    progress: str | None = None,
) -> list[str]:
    """The continuations of :func:`generate_token_ids_with_adapters` as text."""
    ids = generate_token_ids_with_adapters(
        lm, prompts, adapters, config, seeds=seeds, progress=progress
    )
    return [lm.tokenizer.decode(t, skip_special_tokens=True) for t in ids]


@torch.no_grad()
def response_loss(
    lm: LoadedLM,
    pairs: Sequence[tuple[str, str]],
    adapter: TrainedAdapter | None,
    *,
    max_response_tokens: int = 64,
    batch_size: int = 8,
) -> float:
    """Mean next-token cross-entropy of the responses (prompt tokens not counted) with
    ``adapter`` applied through the per-row hooks, in eval mode (no dropout); None: the plain
    LM. The measure of training's progress on held-out pairs."""
    check_pairs(pairs)
    examples = [tokenize_pair(lm, i, r, max_response_tokens) for i, r in pairs]
    stacked = _Stacked(lm, [adapter] * len(examples))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad)
        rows_B = torch.arange(start, start + len(batch.prompt_B))
        width = batch.input_BT.shape[1]
        with stacked.hooks(
            lm, rows_B, torch.zeros_like(batch.prompt_B), batch.prompt_B, width, True
        ):
            logits_BTV = lm.model(
                input_ids=batch.input_BT.to(lm.device),
                attention_mask=batch.mask_BT.to(lm.device),
                use_cache=False,
            ).logits
        n = int((batch.labels_BT[:, 1:] != IGNORE).sum())
        total += float(response_token_loss(logits_BTV, batch.labels_BT.to(lm.device))) * n
        count += n
    return total / count
