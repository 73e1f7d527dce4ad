"""sparse_probing: tasks with real labels, k-sparse selection, probes on a tiny LM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.interpretability import sparse_probing_tasks
from evaluation.interpretability.sparse_probing import (
    SparseProbingConfig,
    compute,
    task_metrics,
    tokenize_texts,
    top_k_by_mean_difference,
)
from evaluation.interpretability.sparse_probing_tasks import (
    TaskSource,
    check_sources,
    load_tasks,
    parse_sources,
    stdlib_tasks,
)
from project.corpus import CorpusSpec, region_description, region_of
from project.hook_cache import HookCache
from project.lm import LoadedLM
from project.saes import SAEConfig, build_sae

# Real labelled sets shipped by the PyPI package sae-probes (installed by make setup).
SPAM, SST2 = "sae_probes:96_spam_is", "sae_probes:92_glue_sst2"


def test_probes_on_real_labelled_data_beat_chance(tiny_lm: LoadedLM) -> None:
    config = SparseProbingConfig(tasks=f"{SPAM},{SST2}", n_train_per_class=150, n_test_per_class=75)
    assert config.corpus_region == ""  # no stdlib text: the corpus regions do not apply
    sae = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=256, k=16)).eval()
    out = compute(sae, tiny_lm, 1, config, HookCache())
    by_task = {d["dataset_name"]: d for d in out.details}
    assert set(by_task) == {"96_spam_is: 1 vs 0", "92_glue_sst2: 1 vs 0"}
    # Even a random LM's mean-pooled residual carries bag-of-words information.
    assert by_task["96_spam_is: 1 vs 0"]["llm_test_accuracy"] > 0.75
    assert out.metrics["llm"]["llm_test_accuracy"] > 0.6
    headline = {
        "sae_test_accuracy",
        "sae_top_1_test_accuracy",
        "sae_top_2_test_accuracy",
        "sae_top_5_test_accuracy",
    }
    intervals = {f"{m}_ci_{end}" for m in headline for end in ("low", "high")}
    assert set(out.metrics["sae"]) == headline | intervals
    for row in out.details:
        assert row["n_train"] == 300 and row["n_test"] == 150
        for key, value in row.items():
            if key.endswith("accuracy"):
                assert 0 <= value <= 1, key
    assert out.metrics["sae"]["sae_test_accuracy"] == pytest.approx(
        np.mean([d["sae_test_accuracy"] for d in out.details])
    )
    assert out.tables["per_task"]["dataset_name"] == list(by_task)


def test_intervals_over_tasks_bracket_the_mean(tiny_lm: LoadedLM) -> None:
    """A 95% bootstrap interval over tasks for every headline mean, logged beside it."""
    config = SparseProbingConfig(tasks="stdlib", n_train_per_class=30, n_test_per_class=15)
    sae = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=256, k=16)).eval()
    out = compute(sae, tiny_lm, 1, config, HookCache())
    flat = out.flat_metrics()
    per_task = [d["llm_test_accuracy"] for d in out.details]
    assert len(per_task) >= 8
    for name in ("llm_test_accuracy", "sae_top_1_test_accuracy", "sae_top_5_test_accuracy"):
        low, mean, high = flat[f"{name}_ci_low"], flat[name], flat[f"{name}_ci_high"]
        assert low < mean < high, name
        assert high - low < 0.5
    # The interval is as wide as the tasks disagree: within the range of per-task values.
    assert min(per_task) <= flat["llm_test_accuracy_ci_low"]
    assert flat["llm_test_accuracy_ci_high"] <= max(per_task)


def test_stdlib_tasks_read_only_the_eval_region() -> None:
    tasks = stdlib_tasks(n_train=40, n_test=20, seed=0)
    texts = {t for task in tasks for t in (*task.train_texts, *task.test_texts)}
    assert len(texts) > 300
    assert {region_of(t) for t in texts} == {"eval"}  # never text a harvest trained on
    config = SparseProbingConfig()
    assert config.corpus_region == region_description(CorpusSpec("stdlib"))


def test_sae_probes_sources_parse_check_and_load() -> None:
    (source,) = parse_sources("sae_probes:96_spam_is")
    assert source.kind == "sae_probes" and source.name == "96_spam_is"
    check_sources(parse_sources("sae_probes:spam_is"))  # the bare tag works too
    with pytest.raises(ValueError, match="no dataset 'spam'; did you mean 96_spam_is"):
        check_sources(parse_sources("sae_probes:spam"))
    with pytest.raises(ValueError, match="names no dataset"):
        parse_sources("sae_probes:")
    (task,) = load_tasks("sae_probes:96_spam_is", n_train=50, n_test=20)
    assert task.name == "96_spam_is: 1 vs 0"
    assert len(task.train_texts) == 100 and sum(task.train_labels) == 50


def test_stdlib_tasks_are_real_balanced_and_disjoint() -> None:
    tasks = stdlib_tasks(n_train=40, n_test=20, seed=0)
    assert len(tasks) >= 8
    names = {t.name for t in tasks}
    assert {
        "stdlib: email vs rest",
        "stdlib: asyncio vs xml",
        "stdlib: docstring vs comment",
    } <= names
    for task in tasks:
        assert sum(task.train_labels) * 2 == len(task.train_labels)
        assert sum(task.test_labels) * 2 == len(task.test_labels)
        assert not set(task.train_texts) & set(task.test_texts)
    # Labels are where the text comes from: email's positives are email's snippets.
    pool = sparse_probing_tasks._stdlib_pool(60, 0)
    package_of = {s.text: s.package for s in pool}
    email = next(t for t in tasks if t.name == "stdlib: email vs rest")
    for text, label in zip(email.train_texts, email.train_labels, strict=True):
        assert (package_of[text] == "email") == bool(label)


def test_effect_size_selection_ignores_a_loud_uninformative_feature() -> None:
    """A feature of huge variance with a small mean shift (a "massive activation" dimension)
    wins SAEBench's raw mean difference; the effect size picks the separating one."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 200)
    X = rng.normal(size=(400, 20))
    X[:, 3] += 1.5 * y  # separates the classes
    X[:, 9] = rng.normal(scale=50.0, size=400) + 4.0 * y  # loud, barely informative
    assert top_k_by_mean_difference(X, y, 1)[0] == 9
    assert top_k_by_mean_difference(X, y, 1, standardise=True)[0] == 3
    raw = task_metrics("llm", X[::2], y[::2], X[1::2], y[1::2], SparseProbingConfig(k_values=(1,)))
    effect = task_metrics(
        "llm",
        X[::2],
        y[::2],
        X[1::2],
        y[1::2],
        SparseProbingConfig(k_values=(1,), top_k_selection="effect_size"),
    )
    assert effect["llm_top_1_test_accuracy"] > raw["llm_top_1_test_accuracy"] + 0.15
    with pytest.raises(ValueError, match="top_k_selection='t_test' is not one of"):
        SparseProbingConfig(top_k_selection="t_test")


def test_top_k_selection_picks_the_separating_latents() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    X = rng.normal(size=(200, 50))
    X[:, 7] += 3 * y
    X[:, 11] -= 2 * y
    assert list(top_k_by_mean_difference(X, y, 2)) == [7, 11]
    config = SparseProbingConfig(k_values=(1, 2))
    metrics = task_metrics("sae", X[::2], y[::2], X[1::2], y[1::2], config)
    assert metrics["sae_top_1_test_accuracy"] > 0.85
    assert set(metrics) == {
        "sae_test_accuracy",
        "sae_top_1_test_accuracy",
        "sae_top_2_test_accuracy",
    }


def test_texts_are_pooled_without_bos_and_padding(tiny_lm: LoadedLM) -> None:
    ids_NT, mask_NT = tokenize_texts(["a b c d e f", "x"], tiny_lm.tokenizer, 4)
    assert ids_NT.shape == (2, 4)
    assert ids_NT[0, 0] == ids_NT[1, 0] == tiny_lm.tokenizer.bos_token_id
    assert mask_NT.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_task_sources_parse() -> None:
    assert parse_sources("stdlib") == [TaskSource("stdlib")]
    (hub,) = parse_sources("hf:stanfordnlp/sst2:sentence:label:validation")
    assert hub == TaskSource("hf", "stanfordnlp/sst2", "sentence", "label", None, "validation")
    (hub,) = parse_sources("hf:glue@sst2:sentence:label")
    assert (hub.name, hub.config_name, hub.split) == ("glue", "sst2", "train")
    (file,) = parse_sources("/data/reviews.csv:review:stars")
    assert file == TaskSource("file", "/data/reviews.csv", "review", "stars")
    for bad in ("hf:only-a-name", "notes.txt", ""):
        with pytest.raises(ValueError):
            parse_sources(bad)


def test_file_sources_are_checked_before_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        SparseProbingConfig(tasks=str(tmp_path / "missing.tsv")).validate()
    path = tmp_path / "reviews.csv"
    path.write_text("review,stars,extra\ngood,5,x\n")
    with pytest.raises(ValueError, match="name the text and label columns"):
        SparseProbingConfig(tasks=str(path)).validate()
    with pytest.raises(ValueError, match="no column 'rating'"):
        SparseProbingConfig(tasks=f"{path}:review:rating").validate()
    SparseProbingConfig(tasks=f"{path}:review:stars").validate()


def test_multiclass_files_give_one_vs_rest_tasks(tmp_path: Path) -> None:
    path = tmp_path / "topics.jsonl"
    rows = [
        {"text": f"{topic} document number {i}", "topic": topic}
        for topic in ("sports", "politics", "science")
        for i in range(40)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tasks = load_tasks(f"{path}:text:topic", n_train=20, n_test=10, max_classes=2)
    assert [t.name for t in tasks] == ["topics: sports vs rest", "topics: politics vs rest"]
    for task in tasks:
        positive = task.name.split(": ")[1].split(" vs")[0]
        for text, label in zip(task.test_texts, task.test_labels, strict=True):
            assert text.startswith(positive) == bool(label)


def test_hub_datasets_are_read_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name, config_name=None, split="train", streaming=False):
        calls.append((name, config_name, split, streaming))
        return iter(
            {"sentence": f"text {i} {'good' if i % 2 else 'bad'}", "label": i % 2}
            for i in range(80)
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    tasks = load_tasks("hf:someone/reviews@en:sentence:label:validation", n_train=20, n_test=10)
    assert calls == [("someone/reviews", "en", "validation", True)]
    (task,) = tasks
    assert task.name == "someone/reviews: 1 vs 0"
    assert len(task.train_texts) == 40 and len(task.test_texts) == 20


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"k_values": (0, 2)}, "k_values"),
        ({"n_train_per_class": 0}, "n_train_per_class=0"),
        ({"max_tokens": 1}, "max_tokens=1"),
        ({"probe_c": 0.0}, "probe_c"),
        ({"tasks": "hf:x"}, "hf:x"),
    ],
)
def test_bad_probing_config_is_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparseProbingConfig(**overrides)


def test_a_second_sae_reuses_the_hook_activations(tiny_lm: LoadedLM, tmp_path: Path) -> None:
    path = tmp_path / "labels.tsv"
    lines = ["text\tlabel"] + [
        f"{'great fine' if i % 2 else 'awful bad'} item {i}\t{i % 2}" for i in range(60)
    ]
    path.write_text("\n".join(lines))
    config = SparseProbingConfig(tasks=str(path), n_train_per_class=20, n_test_per_class=10)
    cache = HookCache()
    saes = [build_sae(SAEConfig(architecture="relu", d_in=64, d_sae=128)).eval() for _ in range(2)]
    first = compute(saes[0], tiny_lm, 1, config, cache)
    misses = cache.misses
    second = compute(saes[1], tiny_lm, 1, config, cache)
    assert cache.misses == misses
    # The LLM probe does not depend on the SAE.
    assert first.metrics["llm"] == second.metrics["llm"]
    assert torch.isfinite(torch.tensor(list(second.metrics["sae"].values()))).all()
