"""sparse_probing: k-sparse probes on SAE latents against probes on the raw activations.

For each binary task (evaluation/interpretability/sparse_probing_tasks.py), every text is run
through the LM to the SAE's hook once (hook activations cached in a
:class:`~project.hook_cache.HookCache` and shared by every SAE), and both the activations and the SAE latents are mean-pooled over the
text's tokens (BOS excluded: its attention-sink norm would dominate the mean). Then, as
SAEBench does:

- ``sae_top_{k}_test_accuracy``: keep the k latents with the largest |mean(pos) − mean(neg)|
  on the train split, fit a logistic regression on them, report test accuracy;
- ``sae_test_accuracy``: the same probe on all latents;
- ``llm_test_accuracy`` (and ``llm_top_{k}_test_accuracy``): the same on the raw activations.

Features are standardised on the train split before the (L2-regularised) logistic regression.
Metrics are means over tasks; per-task values are in the details. Each mean has a 95% bootstrap
interval over tasks (``<metric>_ci_low`` / ``<metric>_ci_high``; ``scipy.stats.bootstrap``, BCa):
it says how far the mean could move with another draw of tasks like these, which is what a
difference between two SAEs has to exceed.

``top_k_selection="effect_size"`` ranks by |mean(pos) − mean(neg)| / pooled standard deviation
instead. SAEBench's raw difference favours features of large variance: SmolLM2's residual
dimension 507 carries "massive activations" (~40 on most tokens, ~800 on 1% of them), so its
pooled value swings with which tokens a text has, and it is picked first on SMS spam with a
train AUC of 0.53 while other dimensions reach 0.96 (LLM top-1 0.54 → 0.70 on spam and SST-2
with the effect size). The default stays SAEBench's, so numbers compare with published ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from evaluation.interpretability.schema import EvalOutput
from evaluation.interpretability.sparse_probing_tasks import (
    STDLIB,
    ProbingTask,
    check_sources,
    load_tasks,
    parse_sources,
)
from project.checks import check_ints
from project.corpus import DEFAULT_CORPUS, CorpusSpec, region_description
from project.hook_cache import HookCache, check_sae_fits
from project.lm import LoadedLM
from project.saes import SparseAutoencoder
from project.statistics import bootstrap_interval

logger = logging.getLogger(__name__)

EVAL_TYPE_ID = "sparse_probing"


TOP_K_SELECTIONS = ("mean_difference", "effect_size")


@dataclass
class SparseProbingConfig:
    """Which tasks, how big, and the probes.

    ``tasks``: comma-separated sources, see evaluation/interpretability/sparse_probing_tasks.py
    (``stdlib``, ``PATH[:TEXT_COLUMN:LABEL_COLUMN]``, ``hf:NAME[@CONFIG]:TEXT_COLUMN:LABEL_COLUMN[:SPLIT]``).
    Each task has ``n_train_per_class`` + ``n_test_per_class`` texts per class (fewer if a class
    is short), each cut to ``max_tokens`` tokens including BOS. ``corpus_region`` (set, not an
    input) states which text the ``stdlib`` tasks come from: the corpus's eval region only.
    """

    tasks: str = "stdlib"
    k_values: tuple[int, ...] = field(default=(1, 2, 5))
    n_train_per_class: int = 100
    n_test_per_class: int = 50
    max_tokens: int = 64
    max_rows: int = 20_000
    max_classes: int = 4
    probe_c: float = 1.0
    top_k_selection: str = "mean_difference"
    batch_size: int = 16
    sae_batch_tokens: int = 4096
    seed: int = 0
    corpus_region: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.k_values = tuple(int(k) for k in self.k_values)
        if not self.k_values or any(k <= 0 for k in self.k_values):
            raise ValueError(f"sparse_probing k_values={self.k_values!r} must be positive ints")
        check_ints(
            self,
            {
                "n_train_per_class": 1,
                "n_test_per_class": 1,
                "max_rows": 1,
                "max_classes": 1,
                "batch_size": 1,
                "sae_batch_tokens": 1,
                "max_tokens": 2,
            },
        )
        if not self.probe_c > 0:
            raise ValueError(f"sparse_probing probe_c={self.probe_c!r} must be > 0")
        if self.top_k_selection not in TOP_K_SELECTIONS:
            raise ValueError(
                f"sparse_probing top_k_selection={self.top_k_selection!r} is not one of "
                f"{', '.join(TOP_K_SELECTIONS)}"
            )
        sources = parse_sources(self.tasks)  # syntax errors name the source
        if any(source.kind == STDLIB for source in sources):
            self.corpus_region = region_description(CorpusSpec(DEFAULT_CORPUS))

    def validate(self) -> None:
        """Checks that read files or the hub (existence, columns), run before any evaluation."""
        check_sources(parse_sources(self.tasks))


# ---------------------------------------------------------------------------------------------
# tokens and pooled features


def tokenize_texts(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_tokens: int
) -> tuple[Tensor, Tensor]:
    """Right-padded ids [N, T] and attention mask, BOS first (when the tokenizer has one)."""
    bos = tokenizer.bos_token_id
    body = max_tokens - 1 if bos is not None else max_tokens
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    rows = [([bos] if bos is not None else []) + ids[:body] for ids in encoded]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_NT = torch.full((len(rows), width), pad, dtype=torch.long)
    mask_NT = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids_NT[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask_NT[i, : len(row)] = 1
    return ids_NT, mask_NT


def _pool_mask(mask_NT: Tensor, has_bos: bool) -> Tensor:
    pool_NT = mask_NT.clone().float()
    if has_bos:
        pool_NT[:, 0] = 0
    # A text of BOS alone (empty after tokenisation) pools over BOS rather than nothing.
    empty = pool_NT.sum(dim=1) == 0
    pool_NT[empty, 0] = 1
    return pool_NT


@torch.no_grad()
def pooled_latents(
    sae: SparseAutoencoder, acts_NTD: Tensor, pool_NT: Tensor, batch_tokens: int
) -> Tensor:
    """Mean over each text's pooled positions of the SAE latents, [N, F]."""
    n, t, d = acts_NTD.shape
    rows_M, cols_M = pool_NT.nonzero(as_tuple=True)
    sums_NF = torch.zeros(n, sae.cfg.d_sae)
    for start in range(0, rows_M.shape[0], batch_tokens):
        r, c = rows_M[start : start + batch_tokens], cols_M[start : start + batch_tokens]
        sums_NF.index_add_(0, r, sae.encode(acts_NTD[r, c]).float())
    return sums_NF / pool_NT.sum(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# probes


def probe_accuracy(
    train_X: np.ndarray,
    train_y: np.ndarray,
    test_X: np.ndarray,
    test_y: np.ndarray,
    c: float,
    seed: int,
) -> float:
    """Test accuracy of a logistic regression fit on standardised train features."""
    scaler = StandardScaler().fit(train_X)
    probe = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    probe.fit(scaler.transform(train_X), train_y)
    return float(probe.score(scaler.transform(test_X), test_y))


def top_k_by_mean_difference(
    train_X: np.ndarray, train_y: np.ndarray, k: int, *, standardise: bool = False
) -> np.ndarray:
    """Indices of the k features with the largest |mean(pos) − mean(neg)| on the train split,
    divided by the pooled within-class standard deviation if ``standardise`` (effect size)."""
    pos, neg = train_X[train_y == 1], train_X[train_y == 0]
    diff = np.abs(pos.mean(axis=0) - neg.mean(axis=0))
    if standardise:
        diff = diff / (np.sqrt((pos.var(axis=0) + neg.var(axis=0)) / 2) + 1e-6)
    k = min(k, diff.shape[0])
    return np.argsort(-diff, kind="stable")[:k]


def task_metrics(
    prefix: str,
    train_X: np.ndarray,
    train_y: np.ndarray,
    test_X: np.ndarray,
    test_y: np.ndarray,
    config: SparseProbingConfig,
) -> dict[str, float]:
    """``{prefix}_test_accuracy`` and ``{prefix}_top_{k}_test_accuracy`` for one task."""
    out = {
        f"{prefix}_test_accuracy": probe_accuracy(
            train_X, train_y, test_X, test_y, config.probe_c, config.seed
        )
    }
    for k in config.k_values:
        idx = top_k_by_mean_difference(
            train_X, train_y, k, standardise=config.top_k_selection == "effect_size"
        )
        out[f"{prefix}_top_{k}_test_accuracy"] = probe_accuracy(
            train_X[:, idx], train_y, test_X[:, idx], test_y, config.probe_c, config.seed
        )
    return out


# ---------------------------------------------------------------------------------------------
# entry


_TASKS: dict[tuple, list[ProbingTask]] = {}


def tasks_for(config: SparseProbingConfig) -> list[ProbingTask]:
    """The config's tasks (read once per process)."""
    key = (
        config.tasks,
        config.n_train_per_class,
        config.n_test_per_class,
        config.max_rows,
        config.max_classes,
        config.seed,
    )
    if key not in _TASKS:
        _TASKS[key] = load_tasks(
            config.tasks,
            n_train=config.n_train_per_class,
            n_test=config.n_test_per_class,
            max_rows=config.max_rows,
            max_classes=config.max_classes,
            seed=config.seed,
        )
    return _TASKS[key]


def compute(
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    config: SparseProbingConfig,
    hook_cache: HookCache | None = None,
) -> EvalOutput:
    """k-sparse probing accuracies of ``sae`` against probes on the raw activations."""
    check_sae_fits(sae, lm, layer)
    hook_cache = hook_cache if hook_cache is not None else HookCache()
    sae.eval()
    tasks = tasks_for(config)
    if not tasks:
        raise ValueError(f"sparse_probing found no usable tasks in {config.tasks!r}")
    # Each distinct text once; sorted by length so that batches carry little padding.
    texts = sorted({t for task in tasks for t in (*task.train_texts, *task.test_texts)})
    ids_NT, mask_NT = tokenize_texts(texts, lm.tokenizer, config.max_tokens)
    order = torch.argsort(mask_NT.sum(dim=1), stable=True)
    ids_NT, mask_NT = ids_NT[order], mask_NT[order]
    row_of = {texts[int(i)]: row for row, i in enumerate(order)}
    acts_NTD = hook_cache.activations(
        lm, layer, ids_NT, mask_NT, desc="sparse_probing: hook activations"
    )
    pool_NT = _pool_mask(mask_NT, lm.tokenizer.bos_token_id is not None)
    llm_ND = ((acts_NTD * pool_NT[..., None]).sum(dim=1) / pool_NT.sum(dim=1, keepdim=True)).numpy()
    sae_NF = pooled_latents(sae, acts_NTD, pool_NT, config.sae_batch_tokens).numpy()

    details = []
    for task in tqdm(tasks, desc="sparse_probing: tasks", leave=False):
        train_rows = [row_of[t] for t in task.train_texts]
        test_rows = [row_of[t] for t in task.test_texts]
        train_y, test_y = np.array(task.train_labels), np.array(task.test_labels)
        row = {"dataset_name": task.name, "n_train": len(train_rows), "n_test": len(test_rows)}
        row |= task_metrics("llm", llm_ND[train_rows], train_y, llm_ND[test_rows], test_y, config)
        row |= task_metrics("sae", sae_NF[train_rows], train_y, sae_NF[test_rows], test_y, config)
        details.append(row)

    def mean_of(name: str) -> float:
        return float(np.mean([d[name] for d in details]))

    names = ["test_accuracy", *(f"top_{k}_test_accuracy" for k in config.k_values)]
    metrics: dict[str, dict[str, float]] = {"llm": {}, "sae": {}}
    for prefix in ("llm", "sae"):
        for n in names:
            name = f"{prefix}_{n}"
            metrics[prefix][name] = mean_of(name)
            if len(details) >= 2:  # an interval over one task says nothing
                low, high = bootstrap_interval([d[name] for d in details], config.seed)
                metrics[prefix][f"{name}_ci_low"] = low
                metrics[prefix][f"{name}_ci_high"] = high
    logger.info(
        "sparse_probing over %d tasks: llm %.3f, sae %.3f, sae top-1 %.3f",
        len(details),
        metrics["llm"]["llm_test_accuracy"],
        metrics["sae"]["sae_test_accuracy"],
        metrics["sae"].get("sae_top_1_test_accuracy", float("nan")),
    )
    return EvalOutput(
        metrics=metrics,
        details=details,
        unstructured={"n_texts": len(texts), "n_tasks": len(details)},
        tables={"per_task": {key: [d[key] for d in details] for key in details[0]}},
    )
