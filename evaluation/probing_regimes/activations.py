"""Last-token residual activations with the paper's tokenisation, cached on disk.

Each text is tokenised with the LM's own tokenizer (its special tokens as it adds them),
truncated on the LEFT to ``max_seq_len`` tokens (so the end of the text, where the last
token is, survives), right-padded in batches; the activation read is the one at the last
real token, after decoder block ``layer`` (``blocks.{layer}.hook_resid_post``). Texts are
batched in length order so little is padded.

One harvest per (LM weights, layer, max_seq_len, texts): the key hashes the LM fingerprint
(project.lm.lm_fingerprint), the layer, the length and every text, and the float32 matrix
lives at ``$SAEFLOW_CACHE_DIR/probe_activations/<key>.npy``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from project.lm import LoadedLM, lm_fingerprint, residual_activations, saeflow_cache_dir
from project.saes import SparseAutoencoder

log = logging.getLogger(__name__)

_FORMAT = "last-token-v1"  # bump if what is stored changes


def cache_dir() -> Path:
    return saeflow_cache_dir() / "probe_activations"


def cache_key(fingerprint: str, layer: int, max_seq_len: int, texts: list[str]) -> str:
    h = hashlib.sha256(f"{_FORMAT}|{fingerprint}|{layer}|{max_seq_len}|{len(texts)}".encode())
    for text in texts:
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:24]


def tokenize_last_token(
    texts: list[str],
    tokenizer,
    max_seq_len: int,  # noqa: ANN001 - any HF tokenizer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B, T], attention mask [B, T], last real position [B]) of a batch: left
    truncation to ``max_seq_len``, right padding."""
    old = tokenizer.truncation_side, tokenizer.padding_side
    tokenizer.truncation_side, tokenizer.padding_side = "left", "right"
    try:
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        encoded = [
            tokenizer(t, truncation=True, max_length=max_seq_len)["input_ids"] for t in texts
        ]
    finally:
        tokenizer.truncation_side, tokenizer.padding_side = old
    lengths = torch.tensor([max(len(e), 1) for e in encoded])
    width = int(lengths.max())
    ids = torch.full((len(texts), width), pad if pad is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        if not e:  # an empty text: read the pad token's position rather than fail
            e = [pad if pad is not None else 0]
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask, lengths - 1


def harvest(
    lm: LoadedLM,
    layer: int,
    texts: list[str],
    max_seq_len: int,
    batch_size: int = 32,
    desc: str = "harvest",
    fingerprint: str | None = None,
) -> np.ndarray:
    """Last-token activations [N, d_model] (float32), read from the cache when present."""
    fingerprint = fingerprint or lm_fingerprint(lm)
    path = cache_dir() / f"{cache_key(fingerprint, layer, max_seq_len, texts)}.npy"
    if path.is_file():
        log.info("%s: %d activations from cache %s", desc, len(texts), path)
        return np.load(path)
    # Length order: each batch pads to its own longest text only.
    token_counts = [len(lm.tokenizer(t)["input_ids"]) for t in texts]
    order = np.argsort(token_counts, kind="stable")
    out = np.zeros((len(texts), lm.d_model), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False):
        rows = order[start : start + batch_size]
        ids, mask, last = tokenize_last_token([texts[i] for i in rows], lm.tokenizer, max_seq_len)
        hidden = residual_activations(lm, ids, layer, mask)  # [B, T, D]
        out[rows] = hidden[torch.arange(len(rows)), last].float().cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, out)
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    log.info("%s: %d activations harvested into %s", desc, len(texts), path)
    return out


@torch.no_grad()
def encode(sae: SparseAutoencoder, acts: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """SAE latents [N, d_sae] (float32) of activations [N, d_in]."""
    chunks = []
    for start in range(0, len(acts), batch_size):
        x = torch.from_numpy(acts[start : start + batch_size]).to(
            dtype=next(sae.parameters()).dtype
        )
        chunks.append(sae.encode(x).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, sae.cfg.d_sae), np.float32)
