"""Hook activations of evaluation tokens, computed once and reused for every SAE.

Evaluations that splice an SAE into the LM need two things per token set: the residual stream
at the SAE's hook (the SAE's input), and the LM's output when that residual is replaced. The
first does not depend on the SAE, so :class:`HookCache` computes it once per (LM, layer, token
set) and keeps it in memory for the process and, if given a directory, on disk as safetensors
keyed by a content hash (LM fingerprint, layer, token ids). Other SAE-independent results (the
clean and zero-ablated losses of core) are cached the same way through :meth:`HookCache.derived`.

:func:`logits_from_hook` runs only the part of the LM after the hook: the decoder blocks up to
and including the hook's are swapped for stubs that hand on the given hidden state, and the
model's own forward does the rest (embeddings are looked up and discarded, which is negligible).
Because the model's forward still builds the attention masks, rotary or learned position
embeddings, final norm, logit soft-capping and lm_head, this works unchanged for every family
``project.lm.decoder_blocks`` knows (Llama/SmolLM2, Qwen2, Gemma2, GPT-2, GPT-NeoX).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from project.lm import (
    LoadedLM,
    check_layer,
    decoder_blocks,
    lm_fingerprint,  # one identity of LM weights for every cache and reuse hash
    residual_activations,
    run_to_block,
)
from project.saes import SparseAutoencoder

logger = logging.getLogger(__name__)

# Bump when what is stored under a key changes, so stale disk entries are not reused.
CACHE_FORMAT = 2  # 2: keys use project.lm.lm_fingerprint
_ACTIVATIONS = "activations"
_PACKED = "activations_at_mask"
_RETURNS_TUPLE: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def default_hook_cache_dir() -> Path:
    """``$SAEFLOW_CACHE_DIR/hook_activations`` (default ``~/.cache/saeflow/hook_activations``)."""
    from project.lm import saeflow_cache_dir

    return saeflow_cache_dir() / "hook_activations"


_SHARED: HookCache | None = None
# Entries the process-wide cache keeps in memory before it drops them (disk copies stay).
_SHARED_MEMORY_ENTRIES = 4


def shared_hook_cache() -> HookCache:
    """One process-wide :class:`HookCache` over the user's hook-cache directory, for the scans
    every SAE of a site repeats (latent statistics, autointerp): the first SAE's LM pass serves
    the others, in this process and later ones. Its memory keeps the last few entries."""
    global _SHARED
    if _SHARED is None:
        _SHARED = HookCache(default_hook_cache_dir())
    if len(_SHARED) > _SHARED_MEMORY_ENTRIES:
        _SHARED.clear_memory()
    return _SHARED


def _digest_tensors(*tensors: Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class HookCache:
    """Hook activations (and SAE-independent derived tensors) per (LM, layer, token set).

    ``directory=None`` keeps everything in memory only; otherwise entries are also written to
    ``directory/<sha256>.safetensors`` (atomically) and read back by later processes.
    """

    def __init__(self, directory: str | Path | None = None, *, batch_size: int = 8) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.directory = Path(directory) if directory is not None else None
        self.batch_size = batch_size
        self._memory: dict[str, dict[str, Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"HookCache(directory={self.directory}, entries={len(self._memory)})"

    def __len__(self) -> int:
        """Entries held in memory."""
        return len(self._memory)

    # ------------------------------------------------------------------ keys and storage
    def key(self, kind: str, lm: LoadedLM, layer: int, *tensors: Tensor | None) -> str:
        payload = {
            "format": CACHE_FORMAT,
            "kind": kind,
            "lm": lm_fingerprint(lm),
            "layer": layer,
            "tokens": _digest_tensors(*tensors),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.safetensors"

    def _lookup(self, key: str) -> dict[str, Tensor] | None:
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self._path(key)
        if path is not None and path.is_file():
            try:
                entry = load_file(str(path))
            except Exception as err:  # a truncated or foreign file: recompute
                logger.warning("ignoring unreadable hook cache entry %s (%s)", path, err)
            else:
                self.hits += 1
                self._memory[key] = entry
                logger.info("hook activations read from %s", path)
                return entry
        self.misses += 1
        return None

    def _store(
        self,
        key: str,
        entry: dict[str, Tensor],
        persist: bool,
        on_disk: dict[str, Tensor] | None = None,
    ) -> None:
        """Keep ``entry`` in memory and (if ``persist``) write ``on_disk`` or ``entry``."""
        self._memory[key] = entry
        path = self._path(key)
        if not persist or path is None:
            return
        entry = on_disk if on_disk is not None else entry
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename: a reader sees a complete file or none.
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:12]}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in entry.items()}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def clear_memory(self) -> None:
        """Drop the in-memory entries (disk entries stay)."""
        self._memory.clear()

    # ------------------------------------------------------------------ public API
    def activations(
        self,
        lm: LoadedLM,
        layer: int,
        tokens_NT: Tensor,
        attention_mask_NT: Tensor | None = None,
        *,
        desc: str = "hook activations",
        batch_size: int | None = None,
    ) -> Tensor:
        """Residual stream after block ``layer`` for every token, [N, T, D] float32 on CPU.

        The LM runs only up to the hook, ``batch_size`` rows at a time (default: the cache's).
        With an attention mask (right padding), each batch is trimmed to its longest row and
        padded positions are returned as zeros.
        """
        check_layer(lm, layer)
        key = self.key(_ACTIVATIONS, lm, layer, tokens_NT, attention_mask_NT)
        entry = self._lookup(key)
        if entry is not None and _ACTIVATIONS not in entry:  # read from disk, packed
            unpacked_NTD = torch.zeros(*tokens_NT.shape, entry[_PACKED].shape[-1])
            unpacked_NTD[attention_mask_NT.bool()] = entry[_PACKED]
            entry = self._memory[key] = {_ACTIVATIONS: unpacked_NTD}
        if entry is not None:
            return entry[_ACTIVATIONS]
        n, t = tokens_NT.shape
        acts_NTD = torch.zeros(n, t, lm.d_model, dtype=torch.float32)
        step = batch_size or self.batch_size
        with tqdm(total=n, desc=desc, unit="seq", leave=False) as bar:
            for start in range(0, n, step):
                ids_BT = tokens_NT[start : start + step]
                mask_BT = None
                width = t
                if attention_mask_NT is not None:
                    mask_BT = attention_mask_NT[start : start + step]
                    width = max(1, int(mask_BT.sum(dim=1).max()))
                    ids_BT, mask_BT = ids_BT[:, :width], mask_BT[:, :width]
                acts_BTD = residual_activations(lm, ids_BT, layer, mask_BT).float().cpu()
                if mask_BT is not None:
                    acts_BTD = acts_BTD * mask_BT[..., None].to(acts_BTD.dtype)
                acts_NTD[start : start + ids_BT.shape[0], :width] = acts_BTD
                bar.update(ids_BT.shape[0])
        # On disk, padded positions are left out (for probing texts they are half the tensor).
        packed = (
            None if attention_mask_NT is None else {_PACKED: acts_NTD[attention_mask_NT.bool()]}
        )
        self._store(key, {_ACTIVATIONS: acts_NTD}, persist=True, on_disk=packed)
        return acts_NTD

    def derived(
        self,
        kind: str,
        lm: LoadedLM,
        layer: int,
        tokens_NT: Tensor,
        compute: Callable[[], dict[str, Tensor]],
        *,
        persist: bool = True,
    ) -> dict[str, Tensor]:
        """SAE-independent tensors computed from a token set (e.g. clean and ablated losses).

        ``kind`` names what ``compute`` returns and must change whenever its definition does.
        ``persist=False`` keeps the entry in memory only (for large tensors such as log-probs).
        """
        key = self.key(f"derived:{kind}", lm, layer, tokens_NT)
        entry = self._lookup(key)
        if entry is None:
            entry = {name: t.detach().cpu() for name, t in compute().items()}
            self._store(key, entry, persist=persist)
        return entry


# ---------------------------------------------------------------------------------------------
# running the LM from the hook onwards


class _HandOn(nn.Module):
    """Stands in for a decoder block at or before the hook: returns a fixed hidden state.

    ``hidden_BTD=None`` returns the block's input unchanged (blocks before the hook, whose
    output the next stub ignores anyway). Attribute reads the model's loop may make on a
    block (e.g. ``attention_type``) fall through to the real block.
    """

    def __init__(self, block: nn.Module, hidden_BTD: Tensor | None, as_tuple: bool) -> None:
        super().__init__()
        self._wrapped = (block,)  # a tuple, so the real block is not registered as a child
        self.hidden_BTD = hidden_BTD
        self.as_tuple = as_tuple

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_wrapped"][0], name)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor | tuple:
        out = hidden_states if self.hidden_BTD is None else self.hidden_BTD
        return (out,) if self.as_tuple else out


def _blocks_return_tuple(lm: LoadedLM) -> bool:
    """Whether this model's decoder blocks return a tuple (older transformers) or a tensor."""
    cached = _RETURNS_TUPLE.get(lm.model)
    if cached is None:
        output = run_to_block(lm, 0, torch.zeros(1, 2, dtype=torch.long))
        cached = _RETURNS_TUPLE[lm.model] = isinstance(output, tuple)
    return cached


def logits_from_hook(
    lm: LoadedLM,
    layer: int,
    input_ids_BT: Tensor,
    hidden_BTD: Tensor,
    attention_mask_BT: Tensor | None = None,
) -> Tensor:
    """Logits [B, T, V] of the LM when block ``layer`` outputs ``hidden_BTD``.

    Only the blocks after ``layer`` (and the final norm and head) do real work. ``input_ids_BT``
    must be the tokens ``hidden_BTD`` was computed from: the model still derives positions and
    masks from them. Equal to a full forward with ``splice_residual(lm, layer, lambda h:
    hidden_BTD)`` up to float rounding.
    """
    check_layer(lm, layer)
    blocks = decoder_blocks(lm.model)
    as_tuple = _blocks_return_tuple(lm)
    dtype = next(lm.model.parameters()).dtype
    originals = [blocks[i] for i in range(layer + 1)]
    try:
        for i in range(layer):
            blocks[i] = _HandOn(originals[i], None, as_tuple)
        blocks[layer] = _HandOn(originals[layer], hidden_BTD.to(lm.device, dtype), as_tuple)
        with torch.inference_mode():
            out = lm.model(
                input_ids=input_ids_BT.to(lm.device),
                attention_mask=None
                if attention_mask_BT is None
                else attention_mask_BT.to(lm.device),
                use_cache=False,
            )
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return out.logits.float()


def check_sae_fits(sae: SparseAutoencoder, lm: LoadedLM, layer: int) -> None:
    """The SAE reads block ``layer`` of ``lm``: the layer exists and the widths agree."""
    check_layer(lm, layer)
    if sae.cfg.d_in != lm.d_model:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} does not match {lm.name} d_model={lm.d_model}")
