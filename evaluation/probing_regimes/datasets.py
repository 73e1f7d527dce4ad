"""Labelled binary datasets for the probing regimes, read and checked before any activation.

Sources (comma-separated in ``ProbeConfig.datasets``):

- ``default``: :data:`DEFAULT_DATASETS`, eight of the paper's datasets with short texts (so a
  CPU harvests them in a minute or two), four of them with a covariate-shift test set;
- ``all``: the paper's 113 binary datasets (``project.sae_probes.dataset_names()``);
- a sae-probes name (``96_spam_is`` or ``spam_is``); its ``<name>_OOD`` test set, where the
  package ships one, is its covariate-shift pair;
- ``hf:NAME[@CONFIG]:TEXT_COL:LABEL_COL[:SPLIT]`` and ``PATH.csv|.tsv|.jsonl|.parquet
  [:TEXT_COL:LABEL_COL]``, parsed and read by evaluation/probing_tasks.py.

Labels are encoded 0/1 in the sorted order of their values (numbers as numbers), as
sae-probes' LabelEncoder does; a label column with one value, or more than two, is an error.
Only the first ``max_rows`` rows are kept, as the paper keeps its first MAX_AMT.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.interpretability.sparse_probing_tasks import (
    SAE_PROBES,
    TaskSource,
    _columns_for,
    _hub_rows,
    _read_rows,
    check_sources,
    parse_sources,
)
from project import sae_probes

log = logging.getLogger(__name__)

DEFAULT_DATASETS = (
    "5_hist_fig_ismale",  # shift: fictional characters
    "7_hist_fig_ispolitician",  # shift: fictional characters
    "87_glue_cola",  # shift: GLUE-X
    "66_living-room",  # shift: translations
    "119_us_state_TX",
    "22_headline_isobama",
    "96_spam_is",
    "92_glue_sst2",
)
OOD_SUFFIX = "_OOD"


@dataclass
class ProbeDataset:
    """One binary dataset: texts, 0/1 labels and (if it has one) its covariate-shift test set."""

    name: str
    texts: list[str]
    labels: np.ndarray
    source: str
    ood_texts: list[str] | None = None
    ood_labels: np.ndarray | None = None

    @property
    def size(self) -> int:
        return len(self.texts)


def _label_key(value: str) -> tuple[int, float | str]:
    try:
        return 0, float(value)
    except ValueError:
        return 1, value


def encode_labels(name: str, column: str, values: list[str]) -> np.ndarray:
    """0/1 labels from a column's values; ValueError naming the dataset unless exactly two."""
    distinct = sorted(set(values), key=_label_key)
    if len(distinct) != 2:
        what = "one class" if len(distinct) == 1 else f"{len(distinct)} classes"
        raise ValueError(
            f"probing dataset {name!r}: label column {column!r} has {what} "
            f"({distinct[:5]}{'...' if len(distinct) > 5 else ''}); a binary probe needs exactly two"
        )
    return np.array([distinct.index(v) for v in values], dtype=np.int64)


def expand(spec: str) -> list[str]:
    """The dataset names a ``datasets`` parameter stands for (``default`` and ``all`` expanded)."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part == "default":
            names.extend(DEFAULT_DATASETS)
        elif part == "all":
            names.extend(sae_probes.dataset_names())
        elif part:
            names.append(part)
    if not names:
        raise ValueError(f"probe datasets={spec!r} names no dataset; use default, all or names")
    return list(dict.fromkeys(names))


def _is_sae_probes(part: str) -> bool:
    return not part.startswith("hf:") and Path(part.split(":")[0]).suffix.lower() not in (
        ".csv",
        ".tsv",
        ".jsonl",
        ".parquet",
    )


def _source(part: str) -> TaskSource:
    if _is_sae_probes(part):
        return TaskSource(SAE_PROBES, part.removeprefix(f"{SAE_PROBES}:"), "prompt", "target")
    (source,) = parse_sources(part)
    return source


def load(part: str, max_rows: int) -> ProbeDataset:
    """Read one dataset (and its OOD pair) and check its labels; ValueError on bad input."""
    source = _source(part)
    if source.kind == SAE_PROBES:
        name = sae_probes.resolve_name(source.name)
        texts, labels = sae_probes.load_dataset(name)
        texts, labels = texts[:max_rows], labels[:max_rows]
        encode_labels(name, "target", [str(v) for v in labels])  # one class after the cap?
        dataset = ProbeDataset(name, texts, labels, f"{SAE_PROBES}:{name}")
        ood = name + OOD_SUFFIX
        if ood in sae_probes.ood_dataset_names():
            dataset.ood_texts, dataset.ood_labels = sae_probes.load_dataset(ood)
        return dataset
    check_sources([source])  # missing file, hub dataset or column: named
    if source.kind == "hf":
        rows = _hub_rows(source, max_rows)
        name = source.name
    else:
        rows = _read_rows(Path(source.name), max_rows)
        name = Path(source.name).stem
    text_col, label_col = _columns_for(source.name, rows, source)
    pairs = [
        (str(r[text_col]), str(r[label_col]).strip())
        for r in rows
        if isinstance(r.get(text_col), str)
        and str(r[text_col]).strip()
        and r.get(label_col) is not None
    ]
    labels = encode_labels(name, label_col, [label for _, label in pairs])
    return ProbeDataset(name, [text for text, _ in pairs], labels, part)


def load_all(spec: str, max_rows: int) -> list[ProbeDataset]:
    """Every dataset ``spec`` names, read and checked."""
    datasets = [load(part, max_rows) for part in expand(spec)]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"probe datasets={spec!r} names a dataset twice: {names}")
    return datasets
