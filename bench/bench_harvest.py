"""Activation harvest speed: saeflow's `harvest` against SAELens 6's Hugging Face path, same tokens.

    .venv/bin/python bench/bench_harvest.py [--n-tokens 20000] [--layer 10] [--batch-size 16]
        [--json figures.json]

What is compared. In one process, both sides turn the same token windows of the embedded
SmolLM2-135M-Instruct into residual-stream activations after block ``--layer`` (saeflow's hook
``blocks.{L}.hook_resid_post``, SAELens' HF module name ``model.layers.{L}``), in the same
batches of ``--batch-size`` windows of 128 tokens, and each keeps every position but the first
(the BOS / attention sink): saeflow by ``exclude_first_position``, SAELens by
``seqpos_slice=(1, None)``. Both LMs are loaded once, before any timing, from the same
de-quantised safetensors checkpoint (``LoadedLM.weights_path``), in float32, and both run one
untimed warm-up batch.

- saeflow: ``project.activation_cache.harvest`` of ``--n-tokens`` tokens of the ``stdlib``
  corpus into a fresh temporary cache root (nothing is reused), logging its run to a temporary
  SQLite tracking store. Two times: the whole ``harvest()`` call (reading and tokenising the
  corpus, the MLflow run, the LM forward to the hook and the safetensors shards), and its own
  forward-and-write loop (``harvest_seconds`` in the cache metadata).
- SAELens: ``sae_lens.load_model("AutoModelForCausalLM", <checkpoint dir>,
  hook_names=[...])`` (a ``HookedProxyLM``, hooked at the one module, as SAELens' training
  runner loads it) under an ``ActivationsStore`` over a pre-tokenised ``datasets.Dataset`` of
  saeflow's windows in harvest order (tokenised by the bench, untimed, with the corpus calls
  the harvest makes). Timed: the store's own batch loop as ``get_raw_llm_batch`` runs it
  (``get_batch_tokens`` then ``get_activations``, which stops the forward after the hook
  module), the activations kept in memory. It does no tokenising and writes nothing. Half its
  batches run before saeflow's harvest and half after, so a load that drifts during the run
  weighs on both sides alike.

The first figure compares like work (the two loops); the second puts saeflow's whole call
against the same SAELens loop, so it charges saeflow for tokenising, tracking and disk. Ratios
are saeflow's tokens/s over SAELens'. Agreement: the two [N, D] activation matrices of the same
tokens, max |diff| over the mean token norm and the per-token cosine. The machine may be shared:
the load average before and after is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from datasets import Dataset
from sae_lens.load_model import load_model
from sae_lens.training.activations_store import ActivationsStore
from torch import Tensor

from bench.figures import Figure
from project.activation_cache import HarvestRequest, harvest
from project.corpus import DEFAULT_CORPUS, iter_texts, resolve_corpus, token_windows
from project.lm import (
    DEFAULT_LM,
    LoadedLM,
    decoder_blocks,
    hook_name,
    load_lm,
    residual_activations,
)
from project.tracking import configure_tracking, init_schema

# 2 x 20k tokens to layer 10: ~30 s of forward if idle (scaled from 3.9k tok/s to layer 3);
# the whole script took 2 min 47 s at load 5.7-7.2 on the 2 cores.
DEFAULT_N_TOKENS = 20_000
REFERENCE_NAME = "SAELens 6 (HF path)"
# float32 reductions over 576 dims in other batch shapes or kernels: far below this.
AGREE_REL_TOL = 1e-4


@dataclass(frozen=True)
class Agreement:
    """How close two activation matrices of the same tokens are."""

    max_abs_diff: float
    mean_norm: float
    min_cosine: float
    mean_cosine: float

    @property
    def relative(self) -> float:
        """max |diff| over the mean token norm."""
        return self.max_abs_diff / self.mean_norm

    @property
    def agrees(self) -> bool:
        return self.relative <= AGREE_REL_TOL

    def describe(self) -> str:
        return (
            f"max |diff| {self.max_abs_diff:.2e} = {self.relative:.1e} of the mean token norm "
            f"{self.mean_norm:.1f}; cosine min {self.min_cosine:.7f}, mean {self.mean_cosine:.7f}"
        )


@dataclass(frozen=True)
class HarvestComparison:
    """One run of both sides (seconds exclude LM loading and warm-up)."""

    model: str
    layer: int
    n_tokens: int
    n_windows: int
    batch_size: int
    saeflow_total_s: float  # the whole harvest() call
    saeflow_loop_s: float  # its forward-and-write loop (cache metadata harvest_seconds)
    saelens_s: float  # ActivationsStore's batch loop
    agreement: Agreement
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    threads: int

    @property
    def saeflow_total_rate(self) -> float:
        return self.n_tokens / self.saeflow_total_s

    @property
    def saeflow_loop_rate(self) -> float:
        return self.n_tokens / self.saeflow_loop_s

    @property
    def saelens_rate(self) -> float:
        return self.n_tokens / self.saelens_s


def agreement(a_ND: Tensor, b_ND: Tensor) -> Agreement:
    """Max |diff|, mean row norm and per-row cosine of two [N, D] matrices."""
    if a_ND.shape != b_ND.shape:
        raise ValueError(f"shapes differ: {tuple(a_ND.shape)} vs {tuple(b_ND.shape)}")
    a_ND, b_ND = a_ND.double(), b_ND.double()
    cos_N = torch.nn.functional.cosine_similarity(a_ND, b_ND, dim=-1)
    return Agreement(
        max_abs_diff=float((a_ND - b_ND).abs().max()),
        mean_norm=float(a_ND.norm(dim=-1).mean()),
        min_cosine=float(cos_N.min()),
        mean_cosine=float(cos_N.mean()),
    )


def module_name(lm: LoadedLM, layer: int) -> str:
    """The HF module path of decoder block ``layer`` (SAELens' hook name on the HF path)."""
    block = decoder_blocks(lm.model)[layer]
    for name, module in lm.model.named_modules():
        if module is block:
            return name
    raise ValueError(f"block {layer} of {lm.name} is not among its named modules")


def harvest_windows(lm: LoadedLM, request: HarvestRequest) -> Tensor:
    """[W, T] the windows saeflow's harvest of ``request`` reads, in its order (the same calls
    as ``activation_cache._tokenize_windows``, through the public corpus functions)."""
    n_windows = math.ceil(request.n_tokens / request.tokens_per_window)
    spec = resolve_corpus(request.corpus, request.text_column, request.split)
    windows = list(
        token_windows(
            iter_texts(spec, "harvest"),
            lm.tokenizer,
            request.context_size,
            n_windows * request.context_size,
        )
    )
    return torch.stack(windows)


def saeflow_side(
    lm: LoadedLM, request: HarvestRequest, workdir: Path, batch_size: int
) -> tuple[Tensor, float, float, int]:
    """saeflow's fresh harvest: (activations [N, D], whole-call seconds, loop seconds, windows).

    The cache root and the tracking store are new directories under ``workdir``, so no cache
    is reused and no run lands in the user's store; the previous tracking URIs are restored.
    """
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    init_schema(uri)  # the schema migration is set-up, not harvest work
    configure_tracking(uri)
    try:
        started = time.perf_counter()
        result = harvest(request, workdir / "activations", lm=lm, batch_size=batch_size)
        total_s = time.perf_counter() - started
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    if result.reused:
        raise RuntimeError(f"harvest reused {result.cache.path}: the timing would be a disk read")
    meta = result.cache.metadata
    acts_ND = result.cache.load_all().float()
    return acts_ND, total_s, float(meta["harvest_seconds"]), int(meta["n_windows"])


def saelens_store(
    weights_path: str, windows_WT: Tensor, hook: str, d_in: int, batch_size: int
) -> ActivationsStore:
    """SAELens' HF model and activations store over the pre-tokenised windows, in order."""
    model = load_model(
        "AutoModelForCausalLM",
        weights_path,
        device="cpu",
        model_from_pretrained_kwargs={"dtype": torch.float32},
        hook_names=[hook],
    )
    dataset = Dataset.from_dict({"input_ids": windows_WT.tolist()})
    return ActivationsStore(
        model=model,
        dataset=dataset,
        streaming=False,
        hook_name=hook,
        hook_head_index=None,
        context_size=windows_WT.shape[1],
        d_in=d_in,
        n_batches_in_buffer=1,
        total_training_tokens=windows_WT.numel(),
        store_batch_size_prompts=batch_size,
        train_batch_size_tokens=batch_size * windows_WT.shape[1],
        prepend_bos=True,  # unused: pre-tokenised rows are read as they are
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
        seqpos_slice=(1, None),  # drop position 0 (BOS), as saeflow does
        exclude_special_tokens=None,  # saeflow keeps the EOS separators inside windows
    )


def saelens_batches(store: ActivationsStore, sizes: list[int]) -> tuple[list[Tensor], float]:
    """SAELens' activations of the store's next windows, ``sizes[i]`` per batch, as [n, D]
    chunks, and the loop's seconds.

    The loop body is ``get_raw_llm_batch``'s, with the batch size passed so the last batch
    holds only the windows left (``get_raw_llm_batch`` would wrap round to the first ones).
    """
    chunks: list[Tensor] = []
    started = time.perf_counter()
    for size in sizes:
        tokens_BT = store.get_batch_tokens(batch_size=size, raise_at_epoch_end=True)
        acts_BTD = store.get_activations(tokens_BT).to(store.device)
        chunks.append(acts_BTD.reshape(-1, store.d_in))
    return chunks, time.perf_counter() - started


def compare(
    n_tokens: int = DEFAULT_N_TOKENS,
    layer: int = 10,
    *,
    batch_size: int = 16,
    context_size: int = 128,
    model: str = DEFAULT_LM,
    corpus: str = DEFAULT_CORPUS,
) -> HarvestComparison:
    """Run both sides on the same windows (module docstring) and check they agree.

    SAELens runs half its batches before saeflow's harvest and half after, so a load that
    drifts during the run weighs on both sides alike.
    """
    request = HarvestRequest(
        model=model, layer=layer, n_tokens=n_tokens, corpus=corpus, context_size=context_size
    )
    request.validate()
    lm = load_lm(model)
    if not lm.weights_path or not Path(lm.weights_path).is_dir():
        raise ValueError(
            f"{model!r} was not read from a local checkpoint directory ({lm.weights_path!r}); "
            "SAELens needs one here (no hub access)"
        )
    hook = module_name(lm, layer)
    windows_WT = harvest_windows(lm, request)
    n_windows = windows_WT.shape[0]
    sizes = [min(batch_size, n_windows - start) for start in range(0, n_windows, batch_size)]
    with warnings.catch_warnings():
        # Each pre-tokenised row (already a tensor) is copied with torch.tensor: a UserWarning.
        warnings.simplefilter("ignore", UserWarning)
        store = saelens_store(lm.weights_path, windows_WT, hook, lm.d_model, batch_size)
        # Random ids: warm kernels and the allocator of both models outside the timing.
        warm_BT = torch.randint(0, len(lm.tokenizer), (batch_size, context_size))
        residual_activations(lm, warm_BT, layer)
        store.get_activations(warm_BT)

        load_before = os.getloadavg()
        first, first_s = saelens_batches(store, sizes[: len(sizes) // 2])
        with tempfile.TemporaryDirectory(prefix="bench-harvest-") as tmp:
            ours_ND, total_s, loop_s, harvested = saeflow_side(lm, request, Path(tmp), batch_size)
        second, second_s = saelens_batches(store, sizes[len(sizes) // 2 :])
        load_after = os.getloadavg()
    if harvested != n_windows:
        raise RuntimeError(f"the harvest read {harvested} windows, the bench tokenised {n_windows}")
    theirs_ND = torch.cat(first + second)[:n_tokens]

    return HarvestComparison(
        model=lm.name,
        layer=layer,
        n_tokens=n_tokens,
        n_windows=n_windows,
        batch_size=batch_size,
        saeflow_total_s=total_s,
        saeflow_loop_s=loop_s,
        saelens_s=first_s + second_s,
        agreement=agreement(ours_ND, theirs_ND),
        load_before=load_before,
        load_after=load_after,
        threads=torch.get_num_threads(),
    )


def figures(result: HarvestComparison) -> list[Figure]:
    """The two benchmark rows of ``result`` (issue 19 states no harvest target)."""
    label = "SmolLM2" if result.model == DEFAULT_LM else Path(result.model).name
    size = f"{result.n_tokens / 1000:g}k tokens"
    note = (
        f"same {result.n_tokens:,} tokens, "
        f"{'agree' if result.agreement.agrees else 'DISAGREE'}: {result.agreement.describe()}; "
        f"load {result.load_before[0]:.1f} -> {result.load_after[0]:.1f}"
    )
    return [
        Figure(
            section="harvest",
            what=f"harvest, {label} layer {result.layer}, {size}: forward to the hook + store",
            saeflow=result.saeflow_loop_rate,
            reference=result.saelens_rate,
            reference_name=REFERENCE_NAME,
            unit="tok/s",
            ratio=result.saeflow_loop_rate / result.saelens_rate,
            note=note,
        ),
        Figure(
            section="harvest",
            what=(
                f"harvest, {label} layer {result.layer}, {size}: whole harvest() call "
                "(+ tokenising, MLflow run, shard files)"
            ),
            saeflow=result.saeflow_total_rate,
            reference=result.saelens_rate,
            reference_name=REFERENCE_NAME,
            unit="tok/s",
            ratio=result.saeflow_total_rate / result.saelens_rate,
            note=note,
        ),
    ]


def measure(
    n_tokens: int = DEFAULT_N_TOKENS,
    layer: int = 10,
    *,
    batch_size: int = 16,
    context_size: int = 128,
    model: str = DEFAULT_LM,
    corpus: str = DEFAULT_CORPUS,
) -> list[Figure]:
    """Both harvests on the same windows: the like-for-like row, then saeflow's whole call."""
    return figures(
        compare(
            n_tokens,
            layer,
            batch_size=batch_size,
            context_size=context_size,
            model=model,
            corpus=corpus,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-tokens", type=int, default=DEFAULT_N_TOKENS)
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    result = compare(args.n_tokens, args.layer, batch_size=args.batch_size)
    load = " ".join(f"{x:.2f}" for x in result.load_before)
    load_end = " ".join(f"{x:.2f}" for x in result.load_after)
    print(
        f"{result.model} {hook_name(result.layer)}: {result.n_tokens:,} tokens in "
        f"{result.n_windows} windows, batch {result.batch_size}, torch {torch.__version__}, "
        f"{result.threads} threads; load average {load} -> {load_end}"
    )
    print(
        f"saeflow harvest() whole call   {result.saeflow_total_s:6.1f}s "
        f"{result.saeflow_total_rate:7.0f} tok/s"
    )
    print(
        f"saeflow forward + write loop   {result.saeflow_loop_s:6.1f}s "
        f"{result.saeflow_loop_rate:7.0f} tok/s"
    )
    print(
        f"SAELens ActivationsStore loop  {result.saelens_s:6.1f}s {result.saelens_rate:7.0f} tok/s"
    )
    print(
        f"ratio saeflow / SAELens: loops {result.saeflow_loop_rate / result.saelens_rate:.2f}x, "
        f"whole call {result.saeflow_total_rate / result.saelens_rate:.2f}x"
    )
    verdict = "agree" if result.agreement.agrees else "DISAGREE"
    print(f"activations {verdict} (tolerance {AGREE_REL_TOL:g}): {result.agreement.describe()}")
    if args.json:
        rows = [figure.as_dict() for figure in figures(result)]
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
