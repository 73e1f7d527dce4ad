"""Trained steering baselines (METHODS.md §3, AxBench's reference methods): LoRA and LoReFT.

Both learn from one concept's (instruction, response) pairs, with the loss on the response
tokens only, and steer without a factor:

- LoRA (:func:`train_lora`, through ``peft``): rank-4 rsLoRA on the attention output
  projection ``o_proj`` of four blocks spread over the depth (:func:`default_layers`);
- LoReFT (:func:`train_loreft`, saeflow's own): ``h + Rᵀ(Wh + b − Rh)`` at the same blocks'
  outputs, on the first and last five prompt positions only.

Training leaves the shared LM as it was; a :class:`TrainedAdapter` holds plain tensors
(:func:`save_adapter` / :func:`load_adapter`). :func:`generate_with_adapters` steers prompt i
with ``adapters[i]`` (or none), so one batch mixes concepts.
"""

from evaluation.steering.trained.apply import (
    adapter_batch_context,
    check_adapter,
    generate_token_ids_with_adapters,
    generate_with_adapters,
    loreft_edit,
    prompt_positions,
    response_loss,
)
from evaluation.steering.trained.config import (
    AXBENCH_LAYERS,
    LOREFT_FIRST,
    LOREFT_LAST,
    METHODS,
    TrainedAdapter,
    TrainedConfig,
    check_layers,
    default_layers,
    load_adapter,
    save_adapter,
    trainable_parameters,
)
from evaluation.steering.trained.data import (
    IGNORE,
    TrainingExample,
    response_token_loss,
    tokenize_pair,
)
from evaluation.steering.trained.train import (
    lora_peft_model,
    train_adapter,
    train_lora,
    train_loreft,
)

__all__ = [
    "AXBENCH_LAYERS",
    "IGNORE",
    "LOREFT_FIRST",
    "LOREFT_LAST",
    "METHODS",
    "TrainedAdapter",
    "TrainedConfig",
    "TrainingExample",
    "adapter_batch_context",
    "check_adapter",
    "check_layers",
    "default_layers",
    "generate_token_ids_with_adapters",
    "generate_with_adapters",
    "load_adapter",
    "lora_peft_model",
    "loreft_edit",
    "prompt_positions",
    "response_loss",
    "response_token_loss",
    "save_adapter",
    "tokenize_pair",
    "train_adapter",
    "train_loreft",
    "train_lora",
    "trainable_parameters",
]
