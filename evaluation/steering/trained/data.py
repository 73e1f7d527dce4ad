"""Training examples of the trained methods: the prompt as generation sees it, the response
after it, the loss on the response tokens only (AxBench: prompt labels −100)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from project.generation import prompt_token_ids
from project.lm import LoadedLM

IGNORE = -100  # the label of a position the loss skips (torch's and HF's convention)


@dataclass(frozen=True)
class TrainingExample:
    """One (instruction, response) pair as token ids: ``labels[t]`` is ``input_ids[t]`` on the
    response and :data:`IGNORE` on the ``prompt_length`` prompt positions."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_length: int


def tokenize_pair(
    lm: LoadedLM, instruction: str, response: str, max_response_tokens: int
) -> TrainingExample:
    """``instruction`` as one user turn through the chat template, no system prompt (the very
    ids :func:`project.generation.generate` prompts with), then the response's tokens and EOS,
    the response part cut to ``max_response_tokens`` (a cut response loses its EOS: the model is
    not taught to stop mid-sentence)."""
    prompt = prompt_token_ids(lm, instruction)
    answer = list(lm.tokenizer(response, add_special_tokens=False)["input_ids"])
    eos = lm.tokenizer.eos_token_id
    if eos is not None:
        answer.append(eos)
    answer = answer[:max_response_tokens]
    return TrainingExample(
        input_ids=tuple(prompt + answer),
        labels=tuple([IGNORE] * len(prompt) + answer),
        prompt_length=len(prompt),
    )


def check_pairs(pairs: Sequence[tuple[str, str]]) -> None:
    """Raise ValueError unless ``pairs`` is a non-empty list of (instruction, response) strings."""
    if not pairs:
        raise ValueError("pairs is empty: training needs at least one (instruction, response)")
    for i, pair in enumerate(pairs):
        if (
            not isinstance(pair, tuple | list)
            or len(pair) != 2
            or not all(isinstance(s, str) and s for s in pair)
        ):
            raise ValueError(
                f"pairs[{i}]={pair!r} must be an (instruction, response) pair of non-empty strings"
            )


@dataclass(frozen=True)
class Batch:
    """Examples right-padded to one width: real tokens at columns ``[0, prompt_B + response)``
    (so position ids are the columns), prompts at ``[0, prompt_B)``."""

    input_BT: Tensor
    mask_BT: Tensor
    labels_BT: Tensor
    prompt_B: Tensor


def collate(examples: Sequence[TrainingExample], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    input_BT = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(examples), width), dtype=torch.long)
    labels_BT = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_BT[b, :n] = torch.tensor(e.input_ids)
        mask_BT[b, :n] = 1
        labels_BT[b, :n] = torch.tensor(e.labels)
    prompt_B = torch.tensor([e.prompt_length for e in examples])
    return Batch(input_BT, mask_BT, labels_BT, prompt_B)


def response_token_loss(logits_BTV: Tensor, labels_BT: Tensor) -> Tensor:
    """Next-token cross-entropy averaged over the labelled positions: the logits at column t
    predict the label at t + 1, so only the last prompt position's logits (predicting the first
    response token) and the response's own count."""
    return F.cross_entropy(
        logits_BTV[:, :-1].flatten(0, 1).float(), labels_BT[:, 1:].flatten(), ignore_index=IGNORE
    )
