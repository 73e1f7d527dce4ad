"""Text corpora for harvesting activations, and packing them into token windows.

A corpus source is one of:

- `"stdlib"` (`DEFAULT_CORPUS`): the docstrings and comment blocks of the Python standard library
  (test suites excluded) plus the `pydoc_data` help topics: real English prose that every Python installation carries. The
  files are parsed with `ast`, never imported (imports have side effects).
- a local `.txt` file (one document per blank-line-separated paragraph), `.jsonl` file (one JSON
  object per line, text in `text_column`), `.parquet` file (text in `text_column`), or a
  directory of such files (read recursively in sorted order);
- otherwise a Hugging Face hub dataset name, streamed with `datasets.load_dataset`.

Every corpus is split into two disjoint regions of whole documents: ``"harvest"`` (what
activation caches, hence SAEs, are trained on) and ``"eval"`` (what evaluations read). The rule
is a hash of each document's text (`region_of`), so it is the same for every corpus kind, needs
no index or count of the corpus (hub datasets stream), and puts duplicated documents in one
region, never both.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import os
import platform
import re
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = "stdlib"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Test suites, IDLE's tests and lib2to3's fixtures are code-like or deliberately broken text.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
MIN_TEXT_CHARS = 40  # one-liners like "Return x." add little text and many EOS tokens
# Names the stdlib file order; part of the corpus fingerprint, so caches of another order miss.
_STDLIB_ORDER = "sha256-v2"  # bump when the order or the text filters change
# The held-out rule: a document is in the eval region when this hash of its text is 0 mod
# _EVAL_SHARE. Changing either changes which text SAEs see: bump _REGION_RULE (it is in the
# activation cache key and in every eval's config).
_REGION_SALT = b"saeflow-region-v1:"
_EVAL_SHARE = 4
_REGION_RULE = f"sha256-v1:1/{_EVAL_SHARE}"
REGIONS = ("harvest", "eval")
_WORD_RE = re.compile(r"[A-Za-z]{3,}")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_VALID_FORMS = (
    f"'{DEFAULT_CORPUS}', a local .txt/.jsonl/.parquet file or a directory of them, "
    "or a Hugging Face hub dataset name"
)


@dataclass(frozen=True)
class CorpusSpec:
    """A validated corpus: `source` is "stdlib", an absolute local path, or a hub dataset name."""

    source: str
    text_column: str = "text"
    split: str = "train"
    config_name: str | None = None

    @property
    def kind(self) -> str:
        """ "stdlib", "local" or "hub"."""
        if self.source == DEFAULT_CORPUS:
            return "stdlib"
        return "local" if Path(self.source).is_absolute() else "hub"


# ---------------------------------------------------------------------------------------------
# stdlib


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The stdlib corpus's source files, in the corpus's fixed order.

    The order is a hash of each file's relative path, not the alphabet: any prefix of the
    corpus (a 100k-token harvest, a 25k-token autointerp scan) then spans dozens of modules,
    where alphabetically a 25k-token scan is almost all ``_pydecimal`` (~27k tokens of text).
    Held-out text comes from the eval region (`iter_texts`), not from a position in this order.
    """
    root = stdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: _order_key(p.relative_to(root).as_posix()))


def _order_key(relative_path: str) -> str:
    return hashlib.sha256(f"{_STDLIB_ORDER}:{relative_path}".encode()).hexdigest()


def docstrings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, text) of module, class and function docstrings."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_TEXT_CHARS:
                yield getattr(node, "lineno", 0), doc


def comment_blocks(source: bytes) -> Iterator[tuple[int, str]]:
    """(line, text) of runs of comments on consecutive lines, joined into one paragraph.

    Comments add half again to the stdlib corpus (docstrings alone are ~0.55M SmolLM2 tokens of
    its ~0.8M) and are English prose about the code just as docstrings are.
    """
    block: list[str] = []
    first = last = -2
    try:
        for tok in tokenize.tokenize(io.BytesIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            text = tok.string.lstrip("#").strip()
            if tok.start[0] != last + 1 and block:
                yield first, " ".join(block)
                block = []
            if not block:
                first = tok.start[0]
            if text:
                block.append(text)
            last = tok.start[0]
    except (tokenize.TokenError, SyntaxError, UnicodeDecodeError):
        return  # keep what was read before the bad token
    if block:
        yield first, " ".join(block)


def is_prose(text: str) -> bool:
    """Whether a comment block reads as prose: mostly letters (drops banners, ascii art and
    commented-out code) and mostly lower-case letters (drops the codec tables of ``encodings``,
    "LATIN CAPITAL LETTER A WITH ...", a fifth of the library's comment text, and shouted
    licence disclaimers: at most half the words may be all capitals)."""
    letters_or_space = sum(c.isalpha() or c.isspace() for c in text)
    words = _WORD_RE.findall(text)
    shouted = sum(w.isupper() for w in words)
    return (
        len(text) >= MIN_TEXT_CHARS
        and letters_or_space >= 0.8 * len(text)
        and shouted <= 0.5 * len(words)
    )


def _pydoc_topics(path: Path) -> Iterator[str]:
    """The help topics dict of pydoc_data/topics.py, read as a literal."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            topics = ast.literal_eval(node.value)
            for key in sorted(topics):
                text = topics[key].strip()
                if text:
                    yield text


def stdlib_file_texts(path: Path) -> Iterator[str]:
    """The docstrings and prose comment blocks of one source file, in source order (related
    text stays adjacent); nothing for a file that does not parse."""
    source = path.read_bytes()
    try:
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return  # a few deliberately invalid files (e.g. bad-encoding fixtures)
    comments = [(line, text) for line, text in comment_blocks(source) if is_prose(text)]
    yield from (text for _, text in sorted([*docstrings(tree), *comments]))


def stdlib_texts(*, from_end: bool = False) -> Iterator[str]:
    """The stdlib corpus's documents, both regions (`iter_texts` reads one region);
    ``from_end`` reads the files last to first and leaves out the pydoc help topics (which close
    the forward order)."""
    root = stdlib_dir()
    topics = root / "pydoc_data" / "topics.py"
    files = [p for p in stdlib_files() if p != topics]
    for path in reversed(files) if from_end else files:
        yield from stdlib_file_texts(path)
    if not from_end and topics.is_file():
        yield from _pydoc_topics(topics)


def _stdlib_fingerprint() -> str:
    h = hashlib.sha256(f"{platform.python_implementation()}:{platform.python_version()}".encode())
    root = stdlib_dir()
    h.update(_STDLIB_ORDER.encode())
    for path in stdlib_files():
        h.update(f"{path.relative_to(root).as_posix()}:{path.stat().st_size};".encode())
    return f"stdlib:{platform.python_version()}:{h.hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------
# local files


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES),
        key=lambda p: p.relative_to(path).as_posix(),
    )


def _iter_txt(path: Path) -> Iterator[str]:
    # One document per blank-line-separated paragraph, read line by line so large files stream.
    lines: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line.rstrip("\n"))
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def _iter_jsonl(path: Path, column: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or column not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{lineno} has no column {column!r} (it has {keys})")
            text = record[column]
            if isinstance(text, str) and text.strip():
                yield text


def _iter_parquet(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def _columns(path: Path) -> list[str] | None:
    """Column names of a jsonl (first record) or parquet file; None for .txt."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    return sorted(record) if isinstance(record, dict) else []
        return None  # an empty file has no columns to check
    return None


def _iter_local(path: Path, column: str) -> Iterator[str]:
    for file in _local_files(path):
        suffix = file.suffix.lower()
        if suffix == ".txt":
            yield from _iter_txt(file)
        elif suffix == ".jsonl":
            yield from _iter_jsonl(file, column)
        elif suffix == ".parquet":
            yield from _iter_parquet(file, column)


def _local_fingerprint(path: Path) -> str:
    # Size + mtime per file is cheap and changes whenever the content is rewritten.
    h = hashlib.sha256()
    for file in _local_files(path):
        st = file.stat()
        h.update(
            f"{file.relative_to(path.parent).as_posix()}:{st.st_size}:{st.st_mtime_ns};".encode()
        )
    return f"local:{path}:{h.hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------
# hub datasets


def _load_hub(spec: CorpusSpec) -> Iterable[dict[str, Any]]:
    import datasets

    return datasets.load_dataset(spec.source, spec.config_name, split=spec.split, streaming=True)


def _check_hub(source: str) -> str:
    """Fail fast on a hub dataset that does not exist or cannot be reached; returns its sha."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"corpus {source!r} is not a local file and HF_HUB_OFFLINE is set, so it cannot be "
            f"streamed from the hub. Valid corpora: {_VALID_FORMS}"
        )
    try:
        info = huggingface_hub.dataset_info(source, timeout=10)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ValueError(
            f"corpus {source!r}: the hub has no accessible dataset of that name. "
            f"Valid corpora: {_VALID_FORMS}"
        ) from e
    except Exception as e:  # network errors come in many types
        raise ValueError(
            f"corpus {source!r} is not a local path and the hub could not be reached to resolve "
            f"it ({type(e).__name__}: {e}). Valid corpora: {_VALID_FORMS}"
        ) from e
    return str(info.sha)


# ---------------------------------------------------------------------------------------------
# public API


def resolve_corpus(
    source: str,
    text_column: str = "text",
    split: str = "train",
    config_name: str | None = None,
) -> CorpusSpec:
    """Validate a corpus source up front and return its spec.

    Raises:
        ValueError: the source is none of the valid forms, does not exist, lacks `text_column`
            (the message lists the available columns), or holds no text at all.
    """
    if not source or not source.strip():
        raise ValueError(f"corpus source is empty. Valid corpora: {_VALID_FORMS}")
    if source == DEFAULT_CORPUS:
        return CorpusSpec(DEFAULT_CORPUS, text_column, split, config_name)

    path = Path(source).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file() and path.suffix.lower() not in LOCAL_SUFFIXES:
            raise ValueError(
                f"corpus file {source!r} has an unsupported suffix {path.suffix!r}; "
                f"local corpora are {', '.join(LOCAL_SUFFIXES)} files or a directory of them"
            )
        files = _local_files(path)
        if not files:
            raise ValueError(
                f"corpus directory {source!r} holds no {'/'.join(LOCAL_SUFFIXES)} files"
            )
        for file in files:
            columns = _columns(file)
            if columns is not None and text_column not in columns:
                raise ValueError(
                    f"corpus file {file} has no column {text_column!r}; available columns: "
                    f"{', '.join(columns)}"
                )
        spec = CorpusSpec(str(path), text_column, split, config_name)
        if next(all_texts(spec), None) is None:
            raise ValueError(
                f"corpus {source!r} is empty: it holds no non-blank text (for .jsonl/.parquet: "
                f"no non-blank string in column {text_column!r})"
            )
        return spec

    if path.suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raise ValueError(f"corpus file {source!r} does not exist. Valid corpora: {_VALID_FORMS}")
    if not _HUB_ID_RE.match(source):
        raise ValueError(
            f"corpus {source!r} is neither an existing path nor a valid hub dataset name. "
            f"Valid corpora: {_VALID_FORMS}"
        )
    _check_hub(source)
    spec = CorpusSpec(source, text_column, split, config_name)
    try:
        first = next(iter(_load_hub(spec)), None)
    except Exception as e:  # datasets raises many types for a bad config or split
        raise ValueError(
            f"corpus {source!r} (config {config_name!r}, split {split!r}) could not be "
            f"streamed: {e}"
        ) from e
    if first is None:
        raise ValueError(f"corpus {source!r} split {split!r} is empty")
    if text_column not in first:
        raise ValueError(
            f"corpus {source!r} has no column {text_column!r}; available columns: "
            f"{', '.join(sorted(first))}"
        )
    return spec


def region_of(text: str) -> str:
    """ "eval" for a quarter of all documents (by a hash of the text), else "harvest"."""
    digest = hashlib.sha256(_REGION_SALT + text.encode("utf-8", "surrogatepass")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % _EVAL_SHARE == 0 else "harvest"


def check_region(region: str) -> str:
    """Return `region` if it is one of `REGIONS`, else raise ValueError naming the choices."""
    if region not in REGIONS:
        raise ValueError(f"corpus region {region!r} is not one of {', '.join(REGIONS)}")
    return region


def region_rule() -> str:
    """A short id of the region rule (part of cache keys and eval configs)."""
    return _REGION_RULE


def region_description(spec: CorpusSpec) -> str:
    """A human-readable statement of the eval region of `spec`, for eval configs and params."""
    return (
        f"eval region of {spec.source!r}: the documents whose sha256 of "
        f"{_REGION_SALT.decode()!r} + text is 0 mod {_EVAL_SHARE} (1 in {_EVAL_SHARE}, rule "
        f"{_REGION_RULE}); harvests read only the other documents"
    )


def iter_texts(spec: CorpusSpec, region: str = "harvest") -> Iterator[str]:
    """The documents of one region of the corpus ("harvest" or "eval"), in the corpus's
    deterministic order (blank documents skipped).

    Raises:
        ValueError: `region` is not "harvest" or "eval" (raised here, before any reading).
    """
    check_region(region)
    return (text for text in all_texts(spec) if region_of(text) == region)


def all_texts(spec: CorpusSpec) -> Iterator[str]:
    """Every document of the corpus, both regions: for checks and counts, never for a harvest
    or an eval (they read one region with `iter_texts`)."""
    kind = spec.kind
    if kind == "stdlib":
        yield from stdlib_texts()
    elif kind == "local":
        yield from _iter_local(Path(spec.source), spec.text_column)
    else:
        for record in _load_hub(spec):
            text = record.get(spec.text_column)
            if isinstance(text, str) and text.strip():
                yield text


def corpus_fingerprint(spec: CorpusSpec) -> str:
    """A stable identity of the corpus content, for cache keys.

    stdlib: Python version + the stdlib file list and sizes; local: path + size and mtime of
    every file; hub: dataset name, config, split and the hub revision sha.
    """
    kind = spec.kind
    if kind == "stdlib":
        base = _stdlib_fingerprint()
    elif kind == "local":
        base = _local_fingerprint(Path(spec.source))
    else:
        sha = _check_hub(spec.source)
        base = f"hub:{spec.source}:{spec.config_name}:{spec.split}:{sha}"
    return f"{base}:column={spec.text_column}"


def token_windows(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    context_size: int,
    n_tokens: int,
    *,
    docs_per_batch: int = 256,
) -> Iterator[Tensor]:
    """Pack tokenized documents into LongTensor windows of exactly `context_size` tokens.

    Documents are concatenated with the EOS token after each one (if the tokenizer has one)
    and cut into windows; each window starts with the BOS token when the tokenizer has one
    (then it carries `context_size - 1` corpus tokens). Yields ceil(n_tokens / context_size)
    windows, i.e. at least `n_tokens` tokens, or fewer windows if the corpus runs out (a final
    partial window is dropped).
    """
    if context_size < 2:
        raise ValueError(f"context_size must be at least 2, got {context_size}")
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = context_size - 1 if bos is not None else context_size
    n_windows = -(-n_tokens // context_size)
    buffer: list[int] = []
    yielded = 0

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == docs_per_batch:
                yield batch
                batch = []
        if batch:
            yield batch

    for batch in batches():
        # Batched calls let a fast tokenizer use its thread pool; verbose=False silences the
        # "longer than model max length" warning, which does not apply to packing.
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for doc_ids in ids:
            buffer.extend(doc_ids)
            if eos is not None:
                buffer.append(eos)
        start = 0
        while len(buffer) - start >= body:
            chunk = buffer[start : start + body]
            start += body
            yield torch.tensor(chunk if bos is None else [bos, *chunk], dtype=torch.long)
            yielded += 1
            if yielded == n_windows:
                return
        del buffer[:start]
    if yielded < n_windows:
        logger.warning(
            "corpus ran out after %d windows of %d tokens (%d requested)",
            yielded,
            context_size,
            n_windows,
        )


def eval_windows(
    corpus: str,
    tokenizer: PreTrainedTokenizerBase,
    context_size: int,
    n_tokens: int,
    *,
    text_column: str = "text",
) -> Tensor:
    """[W, context_size] token windows of ``corpus``'s eval region (the text no harvest reads);
    ValueError when the region has not one full window."""
    spec = resolve_corpus(corpus, text_column=text_column)
    windows = list(
        token_windows(iter_texts(spec, region="eval"), tokenizer, context_size, n_tokens)
    )
    if not windows:
        raise ValueError(f"corpus {corpus!r} has no held-out window of {context_size} tokens")
    return torch.stack(windows)
