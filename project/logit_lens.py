"""The logit lens of a :class:`~project.lm.LoadedLM`: a residual-stream vector read out as if
it were the last hidden state, ``lm_head(final_norm(v))`` (METHODS.md §4).

Applied to an SAE decoder row it gives the tokens latent i promotes, ``ℓ(i)`` (the input and
output scores use its top 20). Knows the families saeflow loads: Llama / SmolLM2, Qwen2,
Mistral (``model.norm``), Gemma2 / Gemma3 (``model.norm``, plus the final logit soft-capping,
which is monotone and so leaves the top tokens alone), multimodal Gemma3
(``model.language_model.norm``), GPT-2 (``transformer.ln_f``) and GPT-NeoX
(``gpt_neox.final_layer_norm``); the unembedding is the model's output embeddings.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from project.lm import LoadedLM

# Where each family keeps the norm applied after its last decoder block.
_FINAL_NORM_PATHS = (
    "model.norm",
    "model.language_model.norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
)
DEFAULT_TOP_TOKENS = 20


def _attribute(obj: object, path: str) -> object | None:
    for attr in path.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


def final_norm(lm: LoadedLM) -> nn.Module:
    """The norm between the last decoder block and the unembedding; ValueError if unknown."""
    for path in _FINAL_NORM_PATHS:
        module = _attribute(lm.model, path)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"cannot find the final norm of {lm.name} ({type(lm.model).__name__}): expected one of "
        f"{', '.join(_FINAL_NORM_PATHS)}"
    )


def unembedding(lm: LoadedLM) -> nn.Module:
    """The output embedding (``lm_head`` / ``embed_out``) of the LM."""
    head = lm.model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{lm.name} ({type(lm.model).__name__}) has no output embeddings")
    return head


def _softcap(lm: LoadedLM) -> float | None:
    cap = getattr(lm.model.config.get_text_config(), "final_logit_softcapping", None)
    return float(cap) if cap else None


@torch.no_grad()
def unembed(lm: LoadedLM, normed_ND: Tensor) -> Tensor:
    """Logits [N, V] of already-normed final hidden states (soft-capped where the LM does)."""
    head = unembedding(lm)
    logits_NV = head(normed_ND.to(lm.device, head.weight.dtype)).float()
    cap = _softcap(lm)
    if cap is not None:
        logits_NV = torch.tanh(logits_NV / cap) * cap
    return logits_NV


@torch.no_grad()
def logit_lens(lm: LoadedLM, vectors_ND: Tensor) -> Tensor:
    """``lm_head(final_norm(v))`` for each row v, float32 logits [N, V].

    Equal to the LM's own logits when v is the residual stream after its last block.
    """
    if vectors_ND.ndim != 2 or vectors_ND.shape[-1] != lm.d_model:
        raise ValueError(
            f"logit_lens needs vectors of shape [N, {lm.d_model}] for {lm.name}, "
            f"got {tuple(vectors_ND.shape)}"
        )
    norm = final_norm(lm)
    dtype = next(norm.parameters(), torch.empty(0, dtype=torch.float32)).dtype
    return unembed(lm, norm(vectors_ND.to(lm.device, dtype)))


@torch.no_grad()
def top_tokens(
    lm: LoadedLM, vectors_ND: Tensor, k: int = DEFAULT_TOP_TOKENS, batch_size: int = 1024
) -> Tensor:
    """Token ids [N, k] of the k largest logit-lens logits of each row, best first."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(lm.tokenizer):
        raise ValueError(f"k={k!r} must be an integer in 1..{len(lm.tokenizer)}")
    out = [
        logit_lens(lm, chunk).topk(k, dim=-1).indices.cpu()
        for chunk in vectors_ND.split(batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def decoder_lens_tokens(lm: LoadedLM, W_dec_FD: Tensor, k: int = DEFAULT_TOP_TOKENS) -> Tensor:
    """``ℓ(i)`` for every latent: the top-k logit-lens tokens [F, k] of each decoder row
    (normalised to unit length first, as METHODS' ``v_i``; the final norm makes the lens
    nearly scale-free anyway)."""
    rows_FD = W_dec_FD.detach().float()
    rows_FD = rows_FD / rows_FD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return top_tokens(lm, rows_FD, k)
