"""``hf``: a local Hugging Face chat model as judge (greedy decoding)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from project.judges.base import ChatJudge
from project.lm import LoadedLM

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# hf


class HFJudge(ChatJudge):
    """A local Hugging Face chat model as judge, greedy decoding, one call at a time.

    Prompts go through the tokenizer's chat template when it has one (plain "role: content"
    turns otherwise); a prompt longer than the model's context is cut from the left.
    """

    name = "hf"

    def __init__(self, judge_lm: LoadedLM, max_new_tokens: int = 128) -> None:
        super().__init__()
        self.lm = judge_lm
        self.max_tokens_rate = max_new_tokens
        self.max_tokens_explain = min(64, max_new_tokens)
        self.max_tokens_detect = min(32, max_new_tokens)

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self.lm.tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
        return tokenizer(text)["input_ids"]

    @torch.no_grad()
    def _chat(self, messages: list[dict[str, str]], max_tokens: int) -> str | None:
        tokenizer, model = self.lm.tokenizer, self.lm.model
        ids = self._prompt_ids(messages)
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if limit and len(ids) + max_tokens > limit:
            logger.warning("hf judge: prompt of %d tokens cut to fit %d", len(ids), limit)
            ids = ids[-(limit - max_tokens) :]
        input_ids = torch.tensor([ids], device=self.lm.device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.lm.name, "max_new_tokens": self.max_tokens_rate}

    def identity(self) -> dict[str, str]:
        return {
            "kind": self.name,
            "model": self.lm.name,
            "endpoint": "local",
            "temperature": "0",  # greedy decoding
            "calibration": "",
        }
