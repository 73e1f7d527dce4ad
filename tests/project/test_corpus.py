from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from project.corpus import (
    DEFAULT_CORPUS,
    REGIONS,
    CorpusSpec,
    all_texts,
    corpus_fingerprint,
    is_prose,
    iter_texts,
    region_description,
    region_of,
    resolve_corpus,
    stdlib_dir,
    stdlib_file_texts,
    stdlib_files,
    stdlib_texts,
    token_windows,
)
from project.lm import LoadedLM

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders decompose activations into interpretable features.",
    "A third document about the weather in spring.",
]


def _write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _write_parquet(path: Path, docs: list[str], column: str = "text") -> Path:
    pq.write_table(pa.table({column: docs, "id": list(range(len(docs)))}), path)
    return path


def test_stdlib_corpus_yields_real_english_text() -> None:
    spec = resolve_corpus(DEFAULT_CORPUS)
    assert spec == CorpusSpec("stdlib")
    texts = list(itertools.islice(iter_texts(spec), 300))
    assert len(texts) == 300
    assert all(isinstance(t, str) and len(t) >= 40 for t in texts)
    words = " ".join(texts).split()
    common = sum(w.lower() in {"the", "a", "of", "to", "is", "and", "in"} for w in words)
    assert common / len(words) > 0.08  # prose, not code
    # Deterministic order.
    assert list(itertools.islice(iter_texts(spec), 300)) == texts
    assert corpus_fingerprint(spec) == corpus_fingerprint(resolve_corpus("stdlib"))


def test_stdlib_order_spreads_any_prefix_over_many_modules() -> None:
    files = stdlib_files()
    relative = [p.relative_to(stdlib_dir()).as_posix() for p in files]
    assert relative != sorted(relative) and len(set(relative)) == len(relative)
    # The first 300 documents come from many files, not one module's docstrings.
    sources = []
    for path in files:
        sources.extend(path.name for _ in stdlib_file_texts(path))
        if len(sources) >= 300:
            break
    assert len(set(sources[:300])) >= 15
    # Read from the end: the same files, reversed, without the help topics.
    tail_docs = list(itertools.islice(stdlib_texts(from_end=True), 5))
    last_with_text = next(p for p in reversed(files) if list(stdlib_file_texts(p)))
    assert tail_docs[0] == next(stdlib_file_texts(last_with_text))


def _region_split(spec: CorpusSpec) -> dict[str, list[str]]:
    return {region: list(iter_texts(spec, region)) for region in REGIONS}


def test_regions_are_disjoint_and_cover_the_stdlib() -> None:
    spec = resolve_corpus(DEFAULT_CORPUS)
    # The first 3000 documents (a whole pass over the stdlib takes ~40 s here).
    everything = list(itertools.islice(all_texts(spec), 3000))
    split = {r: [t for t in everything if region_of(t) == r] for r in REGIONS}
    assert not set(split["harvest"]) & set(split["eval"])
    for region in REGIONS:  # iter_texts reads exactly that region, in corpus order
        assert list(itertools.islice(iter_texts(spec, region), 300)) == split[region][:300]
    # About a quarter of the documents (~200k SmolLM2 tokens of the stdlib's ~800k).
    assert 0.2 < len(split["eval"]) / len(everything) < 0.3
    description = region_description(spec)
    assert "stdlib" in description and "1 in 4" in description


def test_regions_are_disjoint_in_a_local_jsonl(tmp_path: Path) -> None:
    docs = [f"Document number {i} says something about topic {i % 7}." for i in range(400)]
    docs += docs[:50]  # a duplicated document lands in one region, never both
    spec = resolve_corpus(str(_write_jsonl(tmp_path / "docs.jsonl", docs)))
    split = _region_split(spec)
    assert not set(split["harvest"]) & set(split["eval"])
    assert len(split["harvest"]) + len(split["eval"]) == len(docs)
    assert 60 < len(split["eval"]) < 140  # 1 in 4 of 450
    # The order inside a region is the corpus's order.
    assert split["eval"] == [d for d in docs if region_of(d) == "eval"]


def test_unknown_region_fails_before_reading() -> None:
    with pytest.raises(ValueError, match="'test' is not one of harvest, eval"):
        iter_texts(CorpusSpec("/no/such/corpus.jsonl"), "test")


def test_codec_tables_and_shouting_are_not_prose() -> None:
    table = (
        "0x00c4 -> LATIN CAPITAL LETTER A WITH DIAERESIS 0x00c5 -> LATIN CAPITAL LETTER A WITH RING"
    )
    assert not is_prose(table)
    assert not is_prose("THE SOFTWARE IS PROVIDED AS IS WITHOUT WARRANTY OF ANY KIND, EXPRESS")
    assert is_prose(
        "Return the number of bytes written to the stream; see RFC 2822 for the format."
    )
    assert not any("LATIN CAPITAL LETTER" in t for t in itertools.islice(stdlib_texts(), 3000))


def test_local_jsonl_parquet_and_txt(tmp_path: Path) -> None:
    jsonl = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    parquet = _write_parquet(tmp_path / "docs.parquet", DOCS)
    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(DOCS[:2]) + "\n\n\n" + DOCS[2] + "\nsecond line\n")
    for path in (jsonl, parquet):
        spec = resolve_corpus(str(path))
        assert spec.source == str(path.resolve()) and spec.kind == "local"
        assert list(all_texts(spec)) == DOCS
    # .txt: one document per blank-line-separated paragraph.
    assert list(all_texts(resolve_corpus(str(txt)))) == [*DOCS[:2], DOCS[2] + "\nsecond line"]


def test_local_directory_reads_all_files_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _write_jsonl(tmp_path / "b.jsonl", DOCS[1:2])
    _write_parquet(tmp_path / "a.parquet", DOCS[:1])
    (tmp_path / "sub" / "c.txt").write_text(DOCS[2])
    (tmp_path / "ignored.csv").write_text("text\nnot read\n")
    assert list(all_texts(resolve_corpus(str(tmp_path)))) == DOCS


def test_wrong_text_column_lists_available_columns(tmp_path: Path) -> None:
    for path in (
        _write_jsonl(tmp_path / "docs.jsonl", DOCS, column="content"),
        _write_parquet(tmp_path / "docs.parquet", DOCS, column="content"),
    ):
        with pytest.raises(ValueError, match="no column 'text'.*available columns: content, id"):
            resolve_corpus(str(path))
        assert len(list(all_texts(resolve_corpus(str(path), text_column="content")))) == 3


def test_empty_corpus_and_bad_sources_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        resolve_corpus(str(tmp_path / "empty_dir"))
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unsupported suffix '.csv'"):
        resolve_corpus(str(tmp_path / "data.csv"))
    with pytest.raises(ValueError, match="does not exist.*Valid corpora: 'stdlib'"):
        resolve_corpus(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="neither an existing path nor a valid hub"):
        resolve_corpus("not a dataset name!")


def test_unknown_hub_dataset_fails_fast() -> None:
    started = time.perf_counter()
    with pytest.raises(ValueError, match="'no-such-org/no-such-dataset-xyz'.*Valid corpora"):
        resolve_corpus("no-such-org/no-such-dataset-xyz")
    assert time.perf_counter() - started < 15


def test_local_fingerprint_changes_with_content(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    spec = resolve_corpus(str(path))
    before = corpus_fingerprint(spec)
    assert corpus_fingerprint(spec) == before
    _write_jsonl(path, [*DOCS, "one more document"])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert corpus_fingerprint(spec) != before
    other_column = CorpusSpec(spec.source, text_column="title")
    assert corpus_fingerprint(other_column) != corpus_fingerprint(spec)


def test_token_windows_pack_documents(tiny_lm: LoadedLM) -> None:
    tokenizer = tiny_lm.tokenizer
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert bos is not None and eos is not None
    docs = DOCS * 20
    windows = list(token_windows(docs, tokenizer, context_size=16, n_tokens=100))
    assert len(windows) == 7  # ceil(100 / 16)
    assert all(w.shape == (16,) and w.dtype == torch.long for w in windows)
    assert all(w[0] == bos for w in windows)
    # The bodies concatenate to the documents' tokens separated by EOS, in order.
    stream = torch.cat([w[1:] for w in windows]).tolist()
    expected: list[int] = []
    for doc in docs:
        expected += [*tokenizer(doc, add_special_tokens=False).input_ids, eos]
    assert stream == expected[: len(stream)]
    assert eos in stream


def test_token_windows_stops_when_corpus_runs_out(tiny_lm: LoadedLM) -> None:
    windows = list(token_windows(DOCS, tiny_lm.tokenizer, context_size=8, n_tokens=10_000))
    n_body = sum(len(tiny_lm.tokenizer(d, add_special_tokens=False).input_ids) + 1 for d in DOCS)
    assert len(windows) == n_body // 7  # the partial last window is dropped
    with pytest.raises(ValueError, match="context_size"):
        next(token_windows(DOCS, tiny_lm.tokenizer, context_size=1, n_tokens=10))


def test_hub_dataset_with_hub_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        resolve_corpus("some-org/some-dataset")
