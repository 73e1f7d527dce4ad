"""Text generation for every consumer (steering, its references, chat judges): one API.

:func:`generate` takes a list of prompts and returns the continuations:

- prompts go through the tokenizer's chat template when it has one (one user turn, no system
  prompt: a template that would insert a default one of its own gets an empty system turn,
  :func:`chat_text`), else they are tokenized as plain text;
- prompts are sorted by length and run in batches of ``batch_size``, left-padded, with the KV
  cache (``use_cache=False`` recomputes the whole sequence each step: a check, not a mode);
- greedy decoding (``temperature=0``) or sampling at ``temperature`` with one seeded
  ``torch.Generator`` per prompt, so a prompt's sample does not depend on its batch neighbours
  or on the batch size; by default the seed is a hash of (``seed``, prompt text), which makes
  two identical prompts (an unsteered one and one steered with α = 0) sample identically;
- each sequence stops at EOS (or after ``max_new_tokens``); only the new tokens are returned.

An :class:`Intervention` edits the residual stream after decoder block ``layer`` in EVERY forward
pass: all prompt positions in the first pass, and the single new position of every decode step
under the KV cache (hooks that skip one-token steps stop steering after the prompt, a bug
reported against several steering tools). It receives the batch's row indices into the prompt
list, so one batch can mix prompts steered differently. Steering that an edit of one block's
output cannot express (trained adapters: LoRA on a projection, LoReFT on the prompt positions
only) passes a ``batch_context`` instead: a :class:`GenerationBatch` (rows, where each row's
prompt starts under left padding) goes to it before each batch, and the context it returns
(its own hooks) is held while that batch generates.

``compile=True`` runs the LM's forward under ``torch.compile`` (dynamic shapes) while it
generates, compiled once per model in a process: the GPU path of issue 19. The steering hook
and the per-row vectors are inputs of the compiled graph, so new vectors in a new batch do not
recompile it (tested on CPU: the same tokens as eager, greedy and sampled); a new batch size
compiles once more. The first call pays the compilation (about a minute for a 4-block tiny LM
on this CPU), so it is for long runs.

:func:`generate_added` is the steering path: each prompt with its own added vector (a zero
vector: unsteered). Its continuations are remembered for the life of the process, keyed by
everything that decides them (LM weights, layer, decoding settings, prompt, sampling seed, the
vector's bytes), so a study that steers thirty runs on one LM generates each unsteered answer
once, not once per run.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from project.checks import check_bool, check_int
from project.lm import LoadedLM, splice_residual

logger = logging.getLogger(__name__)


class Intervention(Protocol):
    """Edits block ``layer``'s output ``hidden_BTD`` for the prompts ``rows_B`` of the batch."""

    def __call__(self, hidden_BTD: Tensor, rows_B: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class AddVectors:
    """``x ← x + vectors[row]`` at every position (AxBench's addition intervention when
    ``vectors[row] = α · m_i · v_i``; a zero row leaves that prompt unsteered)."""

    vectors_ND: Tensor

    def __call__(self, hidden_BTD: Tensor, rows_B: Tensor) -> Tensor:
        add_BD = self.vectors_ND[rows_B.to(self.vectors_ND.device)]
        return hidden_BTD + add_BD.to(hidden_BTD.device, hidden_BTD.dtype)[:, None, :]


@dataclass(frozen=True)
class GenerationBatch:
    """One batch as :func:`generate_token_ids` runs it, for hooks that steer each row.

    Row ``b`` is prompt ``rows_B[b]``; its prompt fills columns ``[starts_B[b], width)``
    (left padding). The first forward pass over the batch is the prefill of all ``width``
    columns; after it, each decode step runs one new column under the KV cache
    (``use_cache``), or recomputes all columns from 0 (not ``use_cache``).
    """

    rows_B: Tensor
    starts_B: Tensor
    width: int
    use_cache: bool


# Given each batch before it generates; the context it returns is held while it does.
BatchContext = Callable[[GenerationBatch], AbstractContextManager[object]]


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate; ``temperature=0`` is greedy. AxBench samples 128 new tokens at 1.0."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 32
    chat_template: bool = True
    use_cache: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        check_bool("compile", self.compile)
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, int | float)
            or not 0 <= self.temperature <= 10
        ):
            raise ValueError(f"temperature={self.temperature!r} must lie in [0, 10] (0 = greedy)")


def prompt_seed(seed: int, prompt: str) -> int:
    """The default per-prompt sampling seed: stable across processes and batch layouts."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def chat_text(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as one user turn through the tokenizer's chat template, without a system
    prompt (METHODS §3): a template that inserts a default system prompt of its own when the
    conversation has none (SmolLM2's: 19 tokens, half of a typical steering prompt, which
    every generation paid for in its prefill) gets an empty system turn instead, wherever that
    renders shorter; a template without a system role is used as it is."""
    user = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    try:
        empty = tokenizer.apply_chat_template(
            [{"role": "system", "content": ""}, *user], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # noqa: BLE001 - jinja's own exception: the template has no system role
        return text
    return empty if len(empty) < len(text) else text


def prompt_token_ids(lm: LoadedLM, prompt: str, chat_template: bool = True) -> list[int]:
    """The token ids the model is given for ``prompt`` (one user turn through the chat
    template, no system prompt, when the tokenizer has one and ``chat_template`` is set)."""
    tokenizer = lm.tokenizer
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = chat_text(tokenizer, prompt)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


class _RowSampler(LogitsProcessor):
    """Samples each row with its own generator and leaves only that token finite, so that the
    greedy step of ``generate`` picks it (HF's own sampling draws from one global RNG).

    By the inverse CDF: one uniform per row and step from the row's generator, located in the
    row's cumulative distribution (float64), all rows at once. The same distribution as
    ``torch.multinomial`` per row, which cost ~8× more a step at the study's shapes (48 rows,
    a 49k vocabulary): that loop was most of what sampled generation lost to greedy."""

    def __init__(self, generators: list[torch.Generator], temperature: float) -> None:
        self.generators = generators
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs_BV = torch.softmax(scores.float() / self.temperature, dim=-1)
        cdf_BV = probs_BV.cumsum(dim=-1, dtype=torch.float64)
        u_B1 = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        u_B1 = u_B1[:, None].to(cdf_BV.device) * cdf_BV[:, -1:]
        index = torch.searchsorted(cdf_BV, u_B1, right=True).clamp_(max=scores.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(1, index, 0.0)


# One compiled forward per model object for the life of the process (compiling is the cost).
_COMPILED_FORWARDS: weakref.WeakKeyDictionary[torch.nn.Module, Callable[..., Any]] = (
    weakref.WeakKeyDictionary()
)


@contextmanager
def compiled_forward(lm: LoadedLM) -> Iterator[None]:
    """While active, ``lm.model``'s forward is its ``torch.compile``'d form (compiled on first
    use, dynamic shapes); every other caller of the LM outside the block keeps eager."""
    model = lm.model
    if "forward" in vars(model):
        raise RuntimeError("compiled_forward: the LM's forward is already replaced")
    compiled = _COMPILED_FORWARDS.get(model)
    if compiled is None:
        compiled = torch.compile(model.forward, dynamic=True)
        _COMPILED_FORWARDS[model] = compiled
    model.forward = compiled
    try:
        yield
    finally:
        del model.forward


def generate_token_ids(
    lm: LoadedLM,
    prompts: Sequence[str],
    config: GenerationConfig | None = None,
    *,
    layer: int | None = None,
    intervention: Intervention | None = None,
    seeds: Sequence[int] | None = None,
    progress: str | None = None,
    batch_context: BatchContext | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt's continuation (EOS and padding removed).

    Args:
        lm: the model.
        prompts: instructions (a user turn each under the chat template).
        config: decoding settings (default :class:`GenerationConfig`).
        layer: the decoder block whose output ``intervention`` edits.
        intervention: applied at every position of every forward pass; ``None`` generates from
            the plain model.
        seeds: per-prompt sampling seeds (default :func:`prompt_seed` of ``config.seed`` and the
            prompt); ignored by greedy decoding.
        progress: a tqdm description, or None for no bar.
        batch_context: called with each :class:`GenerationBatch`; the context manager it
            returns is entered while that batch generates (per-row hooks of its own).
    """
    config = config or GenerationConfig()
    if (intervention is None) != (layer is None):
        raise ValueError("an intervention needs a layer and a layer needs an intervention")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    if not prompts:
        return []
    tokenizer = lm.tokenizer
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    ids = [prompt_token_ids(lm, p, config.chat_template) for p in prompts]
    seeds = list(seeds) if seeds is not None else [prompt_seed(config.seed, p) for p in prompts]
    # Longest first: similar lengths share a batch (little padding) and the first batch shows
    # the worst memory use at once.
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    results: list[list[int]] = [[] for _ in prompts]
    current_rows: list[Tensor] = [torch.zeros(0, dtype=torch.long)]

    def edit(hidden_BTD: Tensor) -> Tensor:
        assert intervention is not None
        return intervention(hidden_BTD, current_rows[0])

    hook = splice_residual(lm, layer, edit) if intervention is not None else nullcontext()
    compiled = compiled_forward(lm) if config.compile else nullcontext()
    started = time.perf_counter()
    n_new = 0
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    with compiled, hook, torch.inference_mode():
        for batch in tqdm(batches, desc=progress, disable=progress is None, leave=False):
            width = max(len(ids[i]) for i in batch)
            input_BT = torch.full((len(batch), width), pad, dtype=torch.long)
            mask_BT = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                input_BT[b, width - len(ids[i]) :] = torch.tensor(ids[i])
                mask_BT[b, width - len(ids[i]) :] = 1
            current_rows[0] = torch.tensor(batch, dtype=torch.long)
            processors = LogitsProcessorList()
            if config.temperature > 0:
                generators = [torch.Generator().manual_seed(seeds[i]) for i in batch]
                processors.append(_RowSampler(generators, config.temperature))
            batch_hooks = (
                nullcontext()
                if batch_context is None
                else batch_context(
                    GenerationBatch(
                        rows_B=current_rows[0],
                        starts_B=torch.tensor([width - len(ids[i]) for i in batch]),
                        width=width,
                        use_cache=config.use_cache,
                    )
                )
            )
            with batch_hooks:
                out_BT = lm.model.generate(
                    input_ids=input_BT.to(lm.device),
                    attention_mask=mask_BT.to(lm.device),
                    max_new_tokens=config.max_new_tokens,
                    do_sample=False,
                    logits_processor=processors,
                    use_cache=config.use_cache,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    top_k=None,
                    top_p=None,
                    temperature=None,
                )
            for b, i in enumerate(batch):
                new = out_BT[b, width:].tolist()
                if eos is not None and eos in new:
                    new = new[: new.index(eos)]
                results[i] = new
                n_new += len(new)
    seconds = time.perf_counter() - started
    logger.info(
        "generated %d continuations (%d new tokens) in %.1fs: %.0f tok/s",
        len(prompts),
        n_new,
        seconds,
        n_new / max(seconds, 1e-9),
    )
    return results


# (LM fingerprint, layer, decoding settings, prompt, seed, vector digest) -> continuation.
_ADDED_MEMO: dict[tuple[object, ...], str] = {}
_ADDED_MEMO_LIMIT = 200_000  # continuations; a few hundred bytes each


def _vector_digest(vector_D: Tensor) -> str:
    data = vector_D.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def generate_added(
    lm: LoadedLM,
    prompts: Sequence[str],
    vectors_ND: Tensor,
    config: GenerationConfig,
    *,
    layer: int,
    progress: str | None = None,
) -> list[str]:
    """:func:`generate` with ``vectors_ND[i]`` added at block ``layer`` for prompt ``i`` (a zero
    row: unsteered), reusing continuations this process already generated for the same
    (LM, layer, settings, prompt, seed, vector). A prompt's continuation does not depend on its
    batch neighbours (per-prompt seeds), so a remembered one is the one a new batch would give.
    """
    if len(prompts) != vectors_ND.shape[0]:
        raise ValueError(f"{vectors_ND.shape[0]} vectors for {len(prompts)} prompts")
    from project.lm import lm_fingerprint

    settings = (
        lm_fingerprint(lm),
        layer,
        config.max_new_tokens,
        float(config.temperature),
        config.chat_template,
        config.use_cache,
        config.compile,  # a compiled forward may round differently: its own continuations
    )
    keys = [
        (*settings, prompt, prompt_seed(config.seed, prompt), _vector_digest(vector))
        for prompt, vector in zip(prompts, vectors_ND, strict=True)
    ]
    missing: dict[tuple[object, ...], int] = {}
    for i, key in enumerate(keys):
        if key not in _ADDED_MEMO and key not in missing:
            missing[key] = i
    if missing:
        rows = list(missing.values())
        texts = generate(
            lm,
            [prompts[i] for i in rows],
            config,
            layer=layer,
            intervention=AddVectors(vectors_ND[rows]),
            progress=progress,
        )
        if len(_ADDED_MEMO) + len(texts) > _ADDED_MEMO_LIMIT:
            _ADDED_MEMO.clear()
        _ADDED_MEMO.update(zip(missing, texts, strict=True))
    logger.info("steered generation: %d asked, %d generated", len(prompts), len(missing))
    return [_ADDED_MEMO[key] for key in keys]


def generate(
    lm: LoadedLM,
    prompts: Sequence[str],
    config: GenerationConfig | None = None,
    *,
    layer: int | None = None,
    intervention: Intervention | None = None,
    seeds: Sequence[int] | None = None,
    progress: str | None = None,
    batch_context: BatchContext | None = None,
) -> list[str]:
    """The continuation of each prompt as text (special tokens dropped); see
    :func:`generate_token_ids` for the arguments."""
    token_ids = generate_token_ids(
        lm,
        prompts,
        config,
        layer=layer,
        intervention=intervention,
        seeds=seeds,
        progress=progress,
        batch_context=batch_context,
    )
    return [lm.tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]


__all__ = [
    "AddVectors",
    "BatchContext",
    "GenerationBatch",
    "GenerationConfig",
    "Intervention",
    "compiled_forward",
    "generate",
    "generate_added",
    "generate_token_ids",
    "prompt_seed",
    "prompt_token_ids",
]
