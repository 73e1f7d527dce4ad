"""Training LoRA and LoReFT on one concept's (instruction, response) pairs, AxBench's recipe
(METHODS.md §3): next-token cross-entropy on the response tokens only, AdamW with weight decay
0, the lr decayed linearly to 0 over all steps with no warm-up, examples reshuffled every epoch.

The LM is shared by everything else in the process and comes back as it went in: LoRA trains
a ``peft`` wrapper around a copy of the model's module tree that shares its weight tensors
(nothing is copied but the modules; the copy is dropped afterwards), LoReFT trains through
hooks that are removed afterwards, and both freeze the LM's weights only while they train.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from evaluation.steering.trained.apply import loreft_edit, prompt_positions
from evaluation.steering.trained.config import (
    LORA_TARGET,
    TrainedAdapter,
    TrainedConfig,
    check_layers,
    lora_target,
    with_layers,
)
from evaluation.steering.trained.data import (
    Batch,
    TrainingExample,
    check_pairs,
    collate,
    response_token_loss,
    tokenize_pair,
)
from project.lm import LoadedLM, decoder_blocks, splice_residual

logger = logging.getLogger(__name__)


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The model's weights take no gradient while active; their flags come back afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _examples(
    lm: LoadedLM, pairs: Sequence[tuple[str, str]], config: TrainedConfig
) -> list[TrainingExample]:
    return [tokenize_pair(lm, i, r, config.max_response_tokens) for i, r in pairs]


def _fit(
    forward: Callable[[Batch], Tensor],
    params: list[nn.Parameter],
    examples: list[TrainingExample],
    config: TrainedConfig,
    pad_id: int,
    device: torch.device,
) -> tuple[list[float], int, float]:
    """AdamW on ``params`` over ``config.epochs`` seeded shuffles of ``examples``; returns the
    loss of every step, the real tokens seen and the seconds taken."""
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    total = math.ceil(len(examples) / config.batch_size) * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    order = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    n_tokens = 0
    started = time.perf_counter()
    for _ in range(config.epochs):
        perm = torch.randperm(len(examples), generator=order).tolist()
        for start in range(0, len(perm), config.batch_size):
            batch = collate([examples[i] for i in perm[start : start + config.batch_size]], pad_id)
            loss = response_token_loss(forward(batch), batch.labels_BT.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            n_tokens += int(batch.mask_BT.sum())
    return losses, n_tokens, time.perf_counter() - started


def _pad_id(lm: LoadedLM) -> int:
    tokenizer = lm.tokenizer
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)


def _peft_model(lm: LoadedLM, config: TrainedConfig, layers: tuple[int, ...]) -> nn.Module:
    """A ``peft`` LoRA wrapper around a copy of ``lm.model``'s modules that shares its weight
    tensors (peft edits the module tree it wraps; the shared one stays as it is). Call inside
    :func:`_frozen` (peft freezes the base weights, which are the shared ones)."""
    from peft import LoraConfig, get_peft_model

    shared: dict[int, object] = {id(p): p for p in lm.model.parameters()}
    model = copy.deepcopy(lm.model, memo=shared)
    peft_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        target_modules=[LORA_TARGET],
        layers_to_transform=list(layers),
        use_rslora=True,
        lora_dropout=config.lora_dropout,
    )
    return get_peft_model(model, peft_config)


def _lora_layer(peft_model: nn.Module, layer: int, target: str) -> nn.Module:
    return decoder_blocks(peft_model.get_base_model())[layer].get_submodule(target)  # type: ignore[operator]


def _check(
    lm: LoadedLM, pairs: Sequence[tuple[str, str]], config: TrainedConfig, method: str
) -> tuple[int, ...]:
    """The layers to train at, or a ValueError for bad inputs (before any training)."""
    if config.method != method:
        raise ValueError(f"config.method={config.method!r}: train_{method} trains {method!r}")
    check_pairs(pairs)
    return check_layers(config, lm.n_layers)


def train_lora(
    lm: LoadedLM, pairs: Sequence[tuple[str, str]], config: TrainedConfig
) -> TrainedAdapter:
    """rsLoRA (``peft``) of rank ``config.rank`` on the ``o_proj`` of each of ``config``'s
    layers, trained on ``pairs``; the LM is unchanged afterwards.

    Raises:
        ValueError: a method other than LoRA, no pairs, a layer out of range or an LM without
            ``o_proj`` — before any training.
    """
    layers = _check(lm, pairs, config, "lora")
    targets = {layer: lora_target(lm, layer) for layer in layers}
    examples = _examples(lm, pairs, config)
    with _frozen(lm.model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # peft's kaiming init of A and the dropout masks
        model = _peft_model(lm, config, layers)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]

        def forward(batch: Batch) -> Tensor:
            return model(
                input_ids=batch.input_BT.to(lm.device),
                attention_mask=batch.mask_BT.to(lm.device),
                use_cache=False,
            ).logits

        losses, n_tokens, seconds = _fit(forward, params, examples, config, _pad_id(lm), lm.device)
        tensors: dict[str, Tensor] = {}
        scaling = 1.0
        for layer in layers:
            module = _lora_layer(model, layer, targets[layer])
            tensors[f"layers.{layer}.lora_A"] = (
                module.lora_A["default"].weight.detach().cpu().clone()
            )
            tensors[f"layers.{layer}.lora_B"] = (
                module.lora_B["default"].weight.detach().cpu().clone()
            )
            scaling = float(module.scaling["default"])
    _log_done("LoRA", losses, n_tokens, seconds)
    return TrainedAdapter(
        config=with_layers(config, layers),
        tensors=tensors,
        d_model=lm.d_model,
        scaling=scaling,
        target=targets[layers[0]],
        lm_name=lm.name,
        losses=tuple(losses),
        n_tokens=n_tokens,
        seconds=seconds,
    )


def lora_peft_model(lm: LoadedLM, adapter: TrainedAdapter) -> nn.Module:
    """``adapter`` inside a ``peft`` wrapper of (a module copy of) ``lm.model``, in eval mode:
    what peft itself computes with these weights, to check the per-row hooks against, or to
    export with peft's own tools."""
    if adapter.method != "lora":
        raise ValueError(f"adapter.method={adapter.method!r}: only a LoRA adapter has a peft form")
    with _frozen(lm.model), torch.no_grad():
        model = _peft_model(lm, adapter.config, adapter.layers)
        for layer in adapter.layers:
            module = _lora_layer(model, layer, adapter.target)
            A, B = adapter.lora(layer)
            module.lora_A["default"].weight.copy_(A)
            module.lora_B["default"].weight.copy_(B)
    return model.eval()


class _LoreftLayer(nn.Module):
    """``h + Rᵀ(Wh + b − Rh)``: R [rank, d_model] with orthonormal rows (an orthogonal
    parametrization, initialised as pyreft does), W and b a linear map to rank dimensions."""

    def __init__(self, d_model: int, rank: int) -> None:
        super().__init__()
        self.rotate = nn.Linear(d_model, rank, bias=False)
        nn.init.orthogonal_(self.rotate.weight)
        orthogonal(self.rotate)
        self.source = nn.Linear(d_model, rank)


def train_loreft(
    lm: LoadedLM, pairs: Sequence[tuple[str, str]], config: TrainedConfig
) -> TrainedAdapter:
    """LoReFT of rank ``config.rank`` at the block output of each of ``config``'s layers, on
    the first and last five prompt positions (AxBench's f5+l5), trained on ``pairs``; the LM
    is unchanged afterwards.

    Raises:
        ValueError: a method other than LoReFT, no pairs or a layer out of range — before any
            training.
    """
    layers = _check(lm, pairs, config, "loreft")
    examples = _examples(lm, pairs, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        modules = {layer: _LoreftLayer(lm.d_model, config.rank).to(lm.device) for layer in layers}
    params = [p for m in modules.values() for p in m.parameters()]

    def forward(batch: Batch) -> Tensor:
        width = batch.input_BT.shape[1]
        at_BT = prompt_positions(torch.zeros_like(batch.prompt_B), batch.prompt_B, width)
        at_BT = at_BT.to(lm.device)
        with ExitStack() as stack:
            for layer, m in modules.items():
                R_1RD = m.rotate.weight[None]  # the parametrization, computed once a step

                def edit(h_BTD: Tensor, m: _LoreftLayer = m, R_1RD: Tensor = R_1RD) -> Tensor:
                    return loreft_edit(
                        h_BTD, R_1RD, m.source.weight[None], m.source.bias[None], at_BT
                    )

                stack.enter_context(splice_residual(lm, layer, edit))
            return lm.model(
                input_ids=batch.input_BT.to(lm.device),
                attention_mask=batch.mask_BT.to(lm.device),
                use_cache=False,
            ).logits

    with _frozen(lm.model):
        losses, n_tokens, seconds = _fit(forward, params, examples, config, _pad_id(lm), lm.device)
    tensors: dict[str, Tensor] = {}
    with torch.no_grad():
        for layer, m in modules.items():
            tensors[f"layers.{layer}.R"] = m.rotate.weight.detach().cpu().clone()
            tensors[f"layers.{layer}.W"] = m.source.weight.detach().cpu().clone()
            tensors[f"layers.{layer}.b"] = m.source.bias.detach().cpu().clone()
    _log_done("LoReFT", losses, n_tokens, seconds)
    return TrainedAdapter(
        config=with_layers(config, layers),
        tensors=tensors,
        d_model=lm.d_model,
        lm_name=lm.name,
        losses=tuple(losses),
        n_tokens=n_tokens,
        seconds=seconds,
    )


def train_adapter(
    lm: LoadedLM, pairs: Sequence[tuple[str, str]], config: TrainedConfig
) -> TrainedAdapter:
    """:func:`train_lora` or :func:`train_loreft`, as ``config.method`` says."""
    return (train_lora if config.method == "lora" else train_loreft)(lm, pairs, config)


def _log_done(name: str, losses: list[float], n_tokens: int, seconds: float) -> None:
    logger.info(
        "%s: %d steps, %d tokens in %.1fs (%.0f tok/s), loss %.3f -> %.3f",
        name,
        len(losses),
        n_tokens,
        seconds,
        n_tokens / max(seconds, 1e-9),
        losses[0],
        losses[-1],
    )
