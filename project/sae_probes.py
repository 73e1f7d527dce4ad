"""The labelled datasets of the probing paper, read from the PyPI package ``sae-probes``.

``sae-probes`` (Kantamneni et al., "Are Sparse Autoencoders Useful? A Case Study in Sparse
Probing") ships its datasets as zstd-compressed CSV files: ``sae_probes/data/cleaned_data/``
(one file per dataset, named ``<number>_<tag>.csv.zst``), ``OOD data/`` (out-of-distribution
test sets) and ``probing_datasets_MASTER.csv.zst`` (the index: tag, file, data type). Each
dataset file has a ``prompt`` (the text) and a ``target`` column.

The package is installed with ``--no-deps`` (its declared dependencies pin pandas < 3) and is
never imported here: importing it pulls its own modelling stack. Its files are found with
``importlib.util.find_spec``, which locates a package without running it.

Names are the paper's numbered tags (``96_spam_is``, ``92_glue_sst2``); the bare tag
(``spam_is``) and the OOD sets (``5_hist_fig_ismale_OOD``) are accepted too.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PACKAGE = "sae_probes"
INSTALL_HINT = "pip install --no-deps sae-probes==0.4.2 (make setup does)"
TEXT_COLUMN, LABEL_COLUMN = "prompt", "target"
_SUFFIX = ".csv.zst"
_MASTER = "probing_datasets_MASTER.csv.zst"
_BINARY = "Binary Classification"
_NUMBERED = re.compile(r"^(\d+)_(.+)$")


def data_dir() -> Path:
    """``sae_probes/data`` of the installed package; ValueError saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)  # locates, does not import
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "data"
        if (path / "cleaned_data").is_dir():
            return path
    raise ValueError(f"the sae-probes datasets are not installed; {INSTALL_HINT}")


def _read_csv_zst(path: Path) -> list[dict[str, str]]:
    import csv

    import zstandard

    with path.open("rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    return list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))


@lru_cache(maxsize=1)
def _files() -> dict[str, Path]:
    """Every dataset file by its name (numbered tag, or the OOD file's stem)."""
    root = data_dir()
    files = {}
    for folder in (root / "cleaned_data", root / "OOD data"):
        for path in sorted(folder.glob(f"*{_SUFFIX}")) if folder.is_dir() else []:
            files[path.name.removesuffix(_SUFFIX)] = path
    return files


def _number(name: str) -> tuple[int, str]:
    match = _NUMBERED.match(name)
    return (int(match[1]), match[2]) if match else (1 << 30, name)


@lru_cache(maxsize=1)
def dataset_names() -> list[str]:
    """The binary-classification datasets of the index (113 in 0.4.2), by number."""
    rows = _read_csv_zst(data_dir() / _MASTER)
    names = [
        Path(row["Dataset save name"]).name.removesuffix(".csv")
        for row in rows
        if row.get("Data type") == _BINARY and row.get("Dataset save name")
    ]
    present = _files()
    missing = [n for n in names if n not in present]
    if missing:
        logger.warning("sae-probes index lists datasets without a file: %s", missing[:5])
    return sorted((n for n in names if n in present), key=_number)


def ood_dataset_names() -> list[str]:
    """The out-of-distribution test sets (``<number>_<tag>_OOD``) that have a target column."""
    return sorted((n for n in _files() if n.endswith("_OOD")), key=_number)


def resolve_name(name: str) -> str:
    """The file name of a dataset given as numbered tag, bare tag or OOD name; ValueError
    naming the value and a few valid names otherwise."""
    files = _files()
    if name in files:
        return name
    by_tag = {_number(n)[1]: n for n in files}
    if name in by_tag:
        return by_tag[name]
    valid = dataset_names()
    close = [n for n in valid if name.lower() in n.lower()][:5]
    raise ValueError(
        f"sae-probes has no dataset {name!r}; "
        + (f"did you mean {', '.join(close)}? " if close else "")
        + f"valid names include {', '.join(valid[:3])}, ..., {valid[-1]} "
        f"({len(valid)} binary datasets; project.sae_probes.dataset_names() lists them)"
    )


def load_dataset(name: str) -> tuple[list[str], np.ndarray]:
    """``(texts, labels)`` of one dataset: the ``prompt`` column and the ``target`` column
    encoded as integers in the sorted order of its values (as sae-probes' LabelEncoder does:
    0/1 stay 0/1; of two strings, the one that sorts last is 1). Rows with an empty prompt or
    target are dropped.

    Raises:
        ValueError: unknown name (the message lists valid ones), or a file without the columns.
    """
    path = _files()[resolve_name(name)]
    rows = _read_csv_zst(path)
    if rows and (TEXT_COLUMN not in rows[0] or LABEL_COLUMN not in rows[0]):
        raise ValueError(
            f"sae-probes dataset {name!r} has columns {sorted(rows[0])}, not "
            f"{TEXT_COLUMN!r} and {LABEL_COLUMN!r}"
        )
    pairs = [
        (row[TEXT_COLUMN], row[LABEL_COLUMN].strip())
        for row in rows
        if (row.get(TEXT_COLUMN) or "").strip() and (row.get(LABEL_COLUMN) or "").strip()
    ]
    values = sorted({label for _, label in pairs}, key=_label_key)
    index = {value: i for i, value in enumerate(values)}
    texts = [text for text, _ in pairs]
    labels = np.array([index[label] for _, label in pairs], dtype=np.int64)
    return texts, labels


def _label_key(value: str) -> tuple[int, float | str]:
    # Numbers sort as numbers ("10" after "9"), as the LabelEncoder sorts an integer column.
    try:
        return 0, float(value)
    except ValueError:
        return 1, value
