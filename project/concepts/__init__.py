"""Concepts (with labelled example texts) and the instruction pool, read and checked before any
generation; and the concept-seeded dev/test sample of instructions (AxBench's protocol)."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

GENRES = ("text", "code", "math")
SHIPPED_CONCEPTS = "stdlib"
BUILTIN_INSTRUCTIONS = "builtin"
MIN_EXAMPLE_CHARS = 80  # shorter docstrings ("Return x.") say little about a topic


@dataclass(frozen=True)
class Concept:
    """A concept: its description (what the judge reads), a genre, labelled example texts."""

    concept: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    genre: str | None = None


@dataclass(frozen=True)
class Instruction:
    text: str
    genre: str | None = None


@dataclass(frozen=True)
class InstructionSplit:
    """One concept's instructions: the first half of its sample is dev, the rest test."""

    dev: tuple[Instruction, ...]
    test: tuple[Instruction, ...] = field(default=())


# ---------------------------------------------------------------------------------------------
# concepts


def _package_json(name: str) -> dict:
    return json.loads(resources.files("project.concepts").joinpath(name).read_text())


@lru_cache(maxsize=64)
def _stdlib_documents(paths: tuple[str, ...]) -> tuple[str, ...]:
    """Docstrings and prose comments of the stdlib files under ``paths`` (round-robin over the
    files, so that one long module does not fill a concept's examples)."""
    from project.corpus import stdlib_dir, stdlib_file_texts

    root = stdlib_dir()
    files: list[Path] = []
    for rel in paths:
        target = root / rel
        if rel.endswith("/") and target.is_dir():
            files.extend(sorted(p for p in target.rglob("*.py") if "test" not in p.parts))
        elif target.is_file():
            files.append(target)
    per_file = [[t for t in stdlib_file_texts(p) if len(t) >= MIN_EXAMPLE_CHARS] for p in files]
    out: list[str] = []
    for i in range(max((len(t) for t in per_file), default=0)):
        out.extend(texts[i] for texts in per_file if i < len(texts))
    return tuple(out)


def shipped_concepts(
    n_examples: int, n_concepts: int | None = None, seed: int = 0
) -> list[Concept]:
    """saeflow's concepts built from the standard library's text (positives only; the caller
    draws negatives from other concepts): all of them, or a seeded sample of ``n_concepts``
    (only the sampled modules are parsed). Concepts with fewer than ``n_examples`` texts in this
    Python's library are left out (with a warning)."""
    items = _package_json("concepts.json")["concepts"]
    order = list(range(len(items)))
    if n_concepts is not None:
        random.Random(f"concepts:{seed}").shuffle(order)
    chosen: list[int] = []
    for index in order:
        item = items[index]
        texts = _stdlib_documents(tuple(item["stdlib"]))
        if len(texts) < n_examples:
            logger.warning(
                "concept %r has %d texts in this Python's stdlib (< %d); left out",
                item["concept"],
                len(texts),
                n_examples,
            )
            continue
        chosen.append(index)
        if n_concepts is not None and len(chosen) == n_concepts:
            break
    return [
        Concept(
            items[i]["concept"],
            _stdlib_documents(tuple(items[i]["stdlib"]))[:n_examples],
            (),
            items[i].get("genre"),
        )
        for i in sorted(chosen)
    ]


def _check_texts(value: object, key: str, where: str, allow_empty: bool) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
        raise ValueError(f"{where}: {key!r} must be a list of non-empty strings")
    if not value and not allow_empty:
        raise ValueError(f"{where}: {key!r} is empty")
    return tuple(value)


def read_concepts_file(path: str | Path) -> list[Concept]:
    """A user's jsonl of concepts: one object per line with ``concept`` (str), ``positives``
    (non-empty list of str), ``negatives`` (list of str; empty means other concepts' positives)
    and optional ``genre`` (one of text / code / math). Blank lines are skipped.

    Raises:
        ValueError: a missing or empty file, or a malformed line (naming the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"concepts file {str(path)!r} does not exist; give {SHIPPED_CONCEPTS!r} or a jsonl file"
        )
    concepts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"concepts file {path.name} line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON ({err.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where} is not a JSON object")
        missing = [k for k in ("concept", "positives", "negatives") if k not in item]
        if missing:
            raise ValueError(f"{where} lacks the key(s) {missing}")
        name = item["concept"]
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: 'concept' must be a non-empty string")
        genre = item.get("genre")
        if genre is not None and genre not in GENRES:
            raise ValueError(f"{where}: genre {genre!r} is not one of {', '.join(GENRES)}")
        concepts.append(
            Concept(
                name.strip(),
                _check_texts(item["positives"], "positives", where, allow_empty=False),
                _check_texts(item["negatives"], "negatives", where, allow_empty=True),
                genre,
            )
        )
    if not concepts:
        raise ValueError(f"concepts file {str(path)!r} is empty (no concept lines)")
    names = [c.concept for c in concepts]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"concepts file {path.name} repeats the concept(s) {repeated}")
    return concepts


def load_concepts(source: str, n_concepts: int, n_examples: int, seed: int) -> list[Concept]:
    """``n_concepts`` concepts (a seeded sample when the source has more), each with up to
    ``n_examples`` positives and as many negatives (its own, else other concepts' positives).

    Raises:
        ValueError: a bad file (see :func:`read_concepts_file`) or too few concepts.
    """
    pool = (
        shipped_concepts(n_examples) if source == SHIPPED_CONCEPTS else read_concepts_file(source)
    )
    if len(pool) < n_concepts:
        raise ValueError(
            f"n_concepts={n_concepts} but {source!r} has only {len(pool)} usable concepts"
        )
    if n_concepts < len(pool):
        keep = sorted(random.Random(f"concepts:{seed}").sample(range(len(pool)), n_concepts))
        pool = [pool[i] for i in keep]
    out = []
    for i, concept in enumerate(pool):
        negatives = concept.negatives
        if not negatives:
            others = [c.positives for j, c in enumerate(pool) if j != i]
            # Interleave the other concepts so every one of them is represented.
            negatives = tuple(
                t
                for k in range(n_examples)
                for texts in others
                if k < len(texts)
                for t in [texts[k]]
            )
            if not negatives:
                raise ValueError(
                    f"concept {concept.concept!r} has no negatives and there is no other concept "
                    "to borrow them from"
                )
        out.append(
            Concept(
                concept.concept,
                concept.positives[:n_examples],
                negatives[:n_examples],
                concept.genre,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# instructions


def load_instructions(source: str) -> list[Instruction]:
    """The instruction pool: ``builtin`` (saeflow's own, three genres), or a file: .json (a list
    of strings or of {"instruction", "genre"} objects, or {"instructions": [...]}), .jsonl (one
    such object or string per line) or .txt (one instruction per line).

    Raises:
        ValueError: a missing file, a malformed entry (naming it) or zero instructions.
    """
    if source == BUILTIN_INSTRUCTIONS:
        items: list = _package_json("instructions.json")["instructions"]
        where = "builtin instructions"
    else:
        path = Path(source)
        where = f"instructions file {path.name}"
        if not path.is_file():
            raise ValueError(
                f"instructions file {source!r} does not exist; give {BUILTIN_INSTRUCTIONS!r} or "
                "a .json, .jsonl or .txt file"
            )
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where} is not valid JSON ({err.msg})") from None
            items = data.get("instructions", []) if isinstance(data, dict) else data
            if not isinstance(items, list):
                raise ValueError(f"{where}: expected a list of instructions")
        elif path.suffix == ".jsonl":
            items = []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(
                            f"{where} line {number} is not valid JSON ({err.msg})"
                        ) from None
        elif path.suffix == ".txt":
            items = [line.strip() for line in text.splitlines() if line.strip()]
        else:
            raise ValueError(
                f"{where}: unsupported suffix {path.suffix!r}; use .json, .jsonl or .txt"
            )
    pool = []
    for k, item in enumerate(items, start=1):
        if isinstance(item, str):
            item = {"instruction": item}
        text_value = item.get("instruction") if isinstance(item, dict) else None
        if not isinstance(text_value, str) or not text_value.strip():
            raise ValueError(f"{where}: entry {k} has no non-empty 'instruction' string")
        genre = item.get("genre")
        if genre is not None and genre not in GENRES:
            raise ValueError(f"{where}: entry {k} has genre {genre!r}, not one of {GENRES}")
        pool.append(Instruction(text_value.strip(), genre))
    if not pool:
        raise ValueError(f"{where} holds zero instructions")
    return pool


def sample_instructions(
    concept_key: str, pool: list[Instruction], n: int, genre: str | None, seed: int
) -> InstructionSplit:
    """A sample of ``n`` instructions seeded by (seed, concept), from the concept's genre when
    the pool has enough of it; the first ``n // 2`` are dev, the rest test (disjoint)."""
    same_genre = [i for i in pool if genre is not None and i.genre == genre]
    candidates = same_genre if len(same_genre) >= n else pool
    if len(candidates) < n:
        raise ValueError(f"n_instructions={n} but the instruction pool has only {len(pool)}")
    chosen = random.Random(f"instructions:{seed}:{concept_key}").sample(candidates, n)
    return InstructionSplit(tuple(chosen[: n // 2]), tuple(chosen[n // 2 :]))
