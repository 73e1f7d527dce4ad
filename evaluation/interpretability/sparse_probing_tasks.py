"""Binary text-classification tasks with real labels, for sparse probing.

A task source is one of (several are joined with commas in ``SparseProbingConfig.tasks``):

- ``stdlib``: tasks built from the docstrings and comment blocks of the Python standard
  library, labelled by where they come from — the package (``email vs rest``,
  ``asyncio vs xml``, ``http vs urllib``, ...) or what they are (``docstring vs comment``,
  ``class vs function docstring``). Every Python installation carries this text; the files are
  parsed, never imported. Only texts of the stdlib corpus's eval region are used
  (``project.corpus.region_of``), so no probing text is text an SAE was trained on.
- ``PATH[:TEXT_COLUMN:LABEL_COLUMN]``: a local ``.tsv``, ``.csv``, ``.jsonl`` or ``.parquet``
  file with a text and a label column. Without columns, a file with exactly two columns uses
  the one with longer values as text and the other as label.
- ``hf:NAME[@CONFIG]:TEXT_COLUMN:LABEL_COLUMN[:SPLIT]``: a Hugging Face hub dataset, streamed
  (split ``train`` unless named), e.g. ``hf:stanfordnlp/sst2:sentence:label:validation``.
- ``sae_probes:NAME``: one of the probing paper's 113 binary datasets shipped by the PyPI
  package ``sae-probes`` (project/sae_probes.py), e.g. ``sae_probes:96_spam_is``,
  ``sae_probes:92_glue_sst2``; offline, installed by ``make setup``.

A label column with two values gives one task (positive = the value that sorts last, e.g.
``spam`` of ham/spam, ``1`` of 0/1); with more values, one ``value vs rest`` task for each of the
``max_classes`` most frequent values. Every task is balanced (equal positives and negatives,
chance = 0.5) and split into train and test with a fixed seed.
"""

from __future__ import annotations

import ast
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

STDLIB = "stdlib"
SAE_PROBES = "sae_probes"
FILE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".parquet")
_MIN_TRAIN, _MIN_TEST = 10, 5
# Packages present in every CPython 3.11+ (no optional Tk/IDLE, no removed lib2to3/distutils).
STDLIB_PACKAGES = (
    "email",
    "asyncio",
    "xml",
    "http",
    "urllib",
    "multiprocessing",
    "unittest",
    "logging",
    "importlib",
)
_ONE_VS_REST = ("email", "asyncio", "logging", "unittest", "multiprocessing", "importlib", "xml")
_PAIRS = (("asyncio", "xml"), ("http", "urllib"))
_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class TaskSource:
    """One parsed task source: ``kind`` is "stdlib", "file", "hf" or "sae_probes"."""

    kind: str
    name: str = ""  # file path or hub dataset name
    text_column: str | None = None
    label_column: str | None = None
    config_name: str | None = None
    split: str = "train"


@dataclass(frozen=True)
class ProbingTask:
    """A balanced binary task: texts with 0/1 labels, split into train and test."""

    name: str
    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[int, ...]


_FORMS = (
    "'stdlib', PATH[:TEXT_COLUMN:LABEL_COLUMN] (a .tsv/.csv/.jsonl/.parquet file), or "
    "hf:NAME[@CONFIG]:TEXT_COLUMN:LABEL_COLUMN[:SPLIT], or sae_probes:NAME"
)


def parse_sources(spec: str) -> list[TaskSource]:
    """Parse a comma-separated list of task sources (syntax only; nothing is read)."""
    sources = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part == STDLIB:
            sources.append(TaskSource(STDLIB))
        elif part.startswith(f"{SAE_PROBES}:"):
            name = part[len(SAE_PROBES) + 1 :].strip()
            if not name:
                raise ValueError(f"probing task source {part!r} names no dataset; valid: {_FORMS}")
            sources.append(TaskSource(SAE_PROBES, name, "prompt", "target"))
        elif part.startswith("hf:"):
            fields = part[3:].split(":")
            if len(fields) not in (3, 4) or not all(fields):
                raise ValueError(f"probing task source {part!r} is malformed; valid: {_FORMS}")
            name, _, config_name = fields[0].partition("@")
            sources.append(
                TaskSource(
                    "hf",
                    name,
                    fields[1],
                    fields[2],
                    config_name or None,
                    fields[3] if len(fields) == 4 else "train",
                )
            )
        else:
            sources.append(_parse_file_source(part))
    if not sources:
        raise ValueError(f"no probing task sources in {spec!r}; valid: {_FORMS}")
    return sources


def _parse_file_source(part: str) -> TaskSource:
    path, text_col, label_col = Path(part).expanduser(), None, None
    if not path.exists() and part.count(":") >= 2:
        head, text_col, label_col = part.rsplit(":", 2)
        path = Path(head).expanduser()
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise ValueError(
            f"probing task source {part!r} is not a {'/'.join(FILE_SUFFIXES)} file; valid: {_FORMS}"
        )
    return TaskSource("file", str(path), text_col or None, label_col or None)


def check_sources(sources: list[TaskSource]) -> None:
    """Fail early (ValueError naming the source) on a missing file, column or hub dataset."""
    for source in sources:
        if source.kind == "file":
            path = Path(source.name)
            if not path.is_file():
                raise ValueError(f"probing task file {source.name!r} does not exist")
            _columns_for(path, _read_rows(path, limit=50), source)
        elif source.kind == "hf":
            from project.corpus import resolve_corpus

            # Checks the dataset exists (and is reachable) and has the text column.
            resolve_corpus(
                source.name, source.text_column or "text", source.split, source.config_name
            )
        elif source.kind == SAE_PROBES:
            from project.sae_probes import resolve_name

            resolve_name(source.name)  # not installed, or unknown name: lists valid ones


# ---------------------------------------------------------------------------------------------
# reading labelled rows


def _read_rows(path: Path, limit: int) -> list[dict[str, object]]:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        import csv

        import pandas as pd

        # TSV files are taken literally (quotes are text, as in the SMS spam collection).
        frame = pd.read_csv(
            path,
            sep="\t" if suffix == ".tsv" else ",",
            quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL,
            dtype=str,
            keep_default_na=False,
            nrows=limit,
            on_bad_lines="skip",
        )
        return frame.to_dict("records")
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
                if len(rows) >= limit:
                    break
        return rows
    import pyarrow.parquet as pq

    return pq.read_table(path).slice(0, limit).to_pylist()


def _columns_for(
    path: Path | str, rows: list[dict[str, object]], source: TaskSource
) -> tuple[str, str]:
    if not rows:
        raise ValueError(f"probing task source {source.name!r} has no rows")
    columns = list(rows[0])
    if source.text_column and source.label_column:
        for col in (source.text_column, source.label_column):
            if col not in columns:
                raise ValueError(
                    f"probing task source {source.name!r} has no column {col!r}; "
                    f"available: {columns}"
                )
        return source.text_column, source.label_column
    if len(columns) != 2:
        raise ValueError(
            f"probing task file {path} has columns {columns}: name the text and label columns "
            f"as {path}:TEXT_COLUMN:LABEL_COLUMN"
        )

    def mean_len(col: str) -> float:
        return sum(len(str(r[col])) for r in rows) / len(rows)

    text_col = max(columns, key=mean_len)
    return text_col, next(c for c in columns if c != text_col)


def _hub_rows(source: TaskSource, limit: int) -> list[dict[str, object]]:
    import datasets

    stream = datasets.load_dataset(
        source.name, source.config_name, split=source.split, streaming=True
    )
    rows = []
    for record in stream:
        rows.append(dict(record))
        if len(rows) >= limit:
            break
    return rows


def _sae_probes_rows(source: TaskSource, limit: int) -> list[dict[str, object]]:
    from project.sae_probes import load_dataset

    texts, labels = load_dataset(source.name)
    return [{"prompt": t, "target": int(y)} for t, y in zip(texts, labels, strict=True)][:limit]


def _labelled_tasks(
    source: TaskSource,
    rows: list[dict[str, object]],
    *,
    n_train: int,
    n_test: int,
    max_classes: int,
    seed: int,
) -> list[ProbingTask]:
    text_col, label_col = _columns_for(source.name, rows, source)
    label_of: dict[str, str] = {}
    conflicted: set[str] = set()
    for row in rows:
        text, label = row.get(text_col), row.get(label_col)
        if not isinstance(text, str) or not text.strip() or label is None:
            continue
        text, label = text.strip(), str(label).strip()
        if label_of.setdefault(text, label) != label:
            conflicted.add(text)  # the same text under two labels says nothing
    items = [(t, lab) for t, lab in label_of.items() if t not in conflicted]
    counts = Counter(lab for _, lab in items)
    if len(counts) < 2:
        raise ValueError(
            f"probing task source {source.name!r}: column {label_col!r} has fewer than two "
            f"labels ({sorted(counts)})"
        )
    base = Path(source.name).stem if source.kind == "file" else source.name
    if len(counts) == 2:
        negative, positive = sorted(counts)
        pairs = [(f"{base}: {positive} vs {negative}", positive, negative)]
    else:
        top = [lab for lab, _ in counts.most_common(max_classes)]
        pairs = [(f"{base}: {lab} vs rest", lab, None) for lab in top]
    tasks = []
    for name, positive, negative in pairs:
        pos = [t for t, lab in items if lab == positive]
        neg = [t for t, lab in items if (lab == negative if negative else lab != positive)]
        tasks.append(balanced_task(name, pos, neg, n_train=n_train, n_test=n_test, seed=seed))
    return tasks


def balanced_task(
    name: str, positives: list[str], negatives: list[str], *, n_train: int, n_test: int, seed: int
) -> ProbingTask:
    """Sample equal numbers of each class (``n_train + n_test`` each, fewer if short) and split.

    Raises ValueError when a class has too few texts for a meaningful probe.
    """
    rng = random.Random(f"{seed}:{name}")
    n_each = min(n_train + n_test, len(positives), len(negatives))
    n_tr = round(n_each * n_train / (n_train + n_test))
    if n_tr < _MIN_TRAIN or n_each - n_tr < _MIN_TEST:
        raise ValueError(
            f"probing task {name!r} has only {len(positives)} positive and {len(negatives)} "
            f"negative texts; at least {_MIN_TRAIN + _MIN_TEST} of each are needed"
        )
    pos, neg = rng.sample(positives, n_each), rng.sample(negatives, n_each)
    train = [(t, 1) for t in pos[:n_tr]] + [(t, 0) for t in neg[:n_tr]]
    test = [(t, 1) for t in pos[n_tr:]] + [(t, 0) for t in neg[n_tr:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return ProbingTask(
        name=name,
        train_texts=tuple(t for t, _ in train),
        train_labels=tuple(y for _, y in train),
        test_texts=tuple(t for t, _ in test),
        test_labels=tuple(y for _, y in test),
    )


# ---------------------------------------------------------------------------------------------
# stdlib tasks


@dataclass(frozen=True)
class _Snippet:
    text: str
    package: str
    kind: str  # "module", "class", "function" (docstrings) or "comment"


def _package_files(package: str) -> list[Path]:
    from project.corpus import stdlib_dir

    root = stdlib_dir()
    path = root / package
    if not path.is_dir():
        return []
    files = [p for p in path.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _snippets(package: str) -> Iterator[_Snippet]:
    # The corpus's own parsers, so probing text is the same kind of text SAEs are trained on,
    # and its region rule, so it is never the text itself (harvests read the other region).
    from project.corpus import MIN_TEXT_CHARS, comment_blocks, is_prose, region_of

    kinds = {
        ast.Module: "module",
        ast.ClassDef: "class",
        ast.FunctionDef: "function",
        ast.AsyncFunctionDef: "function",
    }
    for path in _package_files(package):
        source = path.read_bytes()
        try:
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            kind = kinds.get(type(node))
            if kind is None:
                continue
            doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
            if doc and len(doc) >= MIN_TEXT_CHARS and region_of(doc) == "eval":
                yield _Snippet(doc, package, kind)
        for _, text in comment_blocks(source):
            if is_prose(text) and region_of(text) == "eval":
                yield _Snippet(text, package, "comment")


@lru_cache(maxsize=4)
def _stdlib_pool(per_package: int, seed: int) -> tuple[_Snippet, ...]:
    """Up to ``per_package`` snippets of each package, deduplicated, sampled with ``seed``."""
    seen: set[str] = set()
    pool: list[_Snippet] = []
    for package in STDLIB_PACKAGES:
        snippets = []
        for s in _snippets(package):
            if s.text not in seen:
                seen.add(s.text)
                snippets.append(s)
        if not snippets:
            logger.warning("stdlib package %s not found: its probing tasks are skipped", package)
            continue
        rng = random.Random(f"{seed}:{package}")
        pool.extend(rng.sample(snippets, min(per_package, len(snippets))))
    return tuple(pool)


def stdlib_tasks(*, n_train: int, n_test: int, seed: int) -> list[ProbingTask]:
    """The built-in tasks (11 on CPython 3.11+): package of origin, and kind of text.

    All tasks draw from one pool of ``n_train + n_test`` snippets per package, so their texts
    overlap and the LM runs over each text once.
    """
    n_each = n_train + n_test
    pool = _stdlib_pool(n_each, seed)
    by_package: dict[str, list[str]] = {}
    for s in pool:
        by_package.setdefault(s.package, []).append(s.text)
    candidates: list[tuple[str, list[str], list[str]]] = []
    for package in _ONE_VS_REST:
        # The pool holds as many snippets of each package, so a uniform sample of the rest
        # spreads over the other packages evenly.
        rest = [t for p in STDLIB_PACKAGES if p != package for t in by_package.get(p, [])]
        candidates.append((f"stdlib: {package} vs rest", by_package.get(package, []), rest))
    for a, b in _PAIRS:
        candidates.append((f"stdlib: {a} vs {b}", by_package.get(a, []), by_package.get(b, [])))
    docstrings = [s.text for s in pool if s.kind != "comment"]
    comments = [s.text for s in pool if s.kind == "comment"]
    candidates.append(("stdlib: docstring vs comment", docstrings, comments))
    classes = [s.text for s in pool if s.kind == "class"]
    functions = [s.text for s in pool if s.kind == "function"]
    candidates.append(("stdlib: class vs function docstring", classes, functions))
    tasks = []
    for name, pos, neg in candidates:
        try:
            tasks.append(balanced_task(name, pos, neg, n_train=n_train, n_test=n_test, seed=seed))
        except ValueError as err:
            logger.warning("skipping %s", err)
    return tasks


# ---------------------------------------------------------------------------------------------
# public entry


def load_tasks(
    spec: str,
    *,
    n_train: int = 100,
    n_test: int = 50,
    max_rows: int = 20_000,
    max_classes: int = 4,
    seed: int = 0,
) -> list[ProbingTask]:
    """All tasks of a comma-separated source list (see the module docstring)."""
    tasks: list[ProbingTask] = []
    for source in parse_sources(spec):
        if source.kind == STDLIB:
            tasks.extend(stdlib_tasks(n_train=n_train, n_test=n_test, seed=seed))
            continue
        if source.kind == "file":
            path = Path(source.name)
            if not path.is_file():
                raise ValueError(f"probing task file {source.name!r} does not exist")
            rows = _read_rows(path, limit=max_rows)
        elif source.kind == SAE_PROBES:
            rows = _sae_probes_rows(source, limit=max_rows)
        else:
            rows = _hub_rows(source, limit=max_rows)
        tasks.extend(
            _labelled_tasks(
                source,
                rows,
                n_train=n_train,
                n_test=n_test,
                max_classes=max_classes,
                seed=seed,
            )
        )
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"probing task names repeat: {duplicates}; list each source once")
    return tasks
