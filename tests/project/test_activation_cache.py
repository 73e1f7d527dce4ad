from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import boto3
import mlflow
import pytest
import torch

import project.activation_cache as activation_cache
from project.activation_cache import (
    ActivationCache,
    HarvestRequest,
    cache_key,
    harvest,
)
from project.corpus import iter_texts, region_of, resolve_corpus, token_windows
from project.lm import LoadedLM, hook_name, residual_activations

N_TOKENS = 500
CONTEXT = 32


def _request(**overrides: object) -> HarvestRequest:
    fields = {
        "model": "tiny-random-llama",
        "layer": 1,
        "n_tokens": N_TOKENS,
        "context_size": CONTEXT,
    }
    return HarvestRequest(**{**fields, **overrides})


def _runs() -> list[mlflow.entities.Run]:
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The cache root (tmp_path itself also holds the test's MLflow store)."""
    return tmp_path / "activations"


def test_harvest_logs_one_run_then_reuses(tiny_lm: LoadedLM, tracking_uri: str, root: Path) -> None:
    result = harvest(_request(), root, lm=tiny_lm, shard_bytes=64 * 4 * 100)
    assert not result.reused and result.harvest_run_id
    cache = result.cache
    assert (cache.n_tokens, cache.d_in) == (N_TOKENS, 64)
    assert cache.hook_name == hook_name(1) == cache.metadata["hook_name"]
    assert cache.metadata["harvest_run_id"] == result.harvest_run_id
    assert cache.metadata["model_name"] == "tiny-random-llama"
    assert len(cache.shard_paths) == 5  # 100 rows per shard
    assert cache.path.parent == root.resolve()
    acts_ND = cache.load_all()
    assert acts_ND.shape == (N_TOKENS, 64) and acts_ND.dtype == torch.float32

    # The cached rows are the hook activations of the corpus windows, position 0 excluded.
    spec = resolve_corpus("stdlib")
    harvest_texts = iter_texts(spec, "harvest")
    first_WT = torch.stack(list(token_windows(harvest_texts, tiny_lm.tokenizer, CONTEXT, 64)))
    expected_ND = residual_activations(tiny_lm, first_WT, 1)[:, 1:].reshape(-1, 64)
    torch.testing.assert_close(acts_ND[: expected_ND.shape[0]], expected_ND, atol=1e-5, rtol=1e-5)

    runs = _runs()
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == result.harvest_run_id and run.info.status == "FINISHED"
    assert run.data.tags["saeflow.run_type"] == "harvest"
    assert run.data.tags["saeflow.cache_key"] == cache.path.name
    assert run.data.tags["saeflow.cache_uri"] == str(cache.path)
    assert run.data.params["layer"] == "1" and run.data.params["d_in"] == "64"
    assert run.data.params["hook_name"] == "blocks.1.hook_resid_post"
    assert run.data.metrics["n_tokens"] == N_TOKENS
    assert run.data.metrics["tokens_per_second"] > 0
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "stdlib"
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "harvest"

    again = harvest(_request(), root, lm=tiny_lm)
    assert again.reused and again.harvest_run_id == result.harvest_run_id
    assert again.cache.path == cache.path
    assert torch.equal(again.cache.load_all(), acts_ND)
    assert len(_runs()) == 1  # no new run


def test_different_layer_is_a_new_key_and_nests_under_active_run(
    tiny_lm: LoadedLM, tracking_uri: str, root: Path
) -> None:
    with mlflow.start_run(run_name="parent") as parent:
        first = harvest(_request(layer=1, n_tokens=40), root, lm=tiny_lm)
        second = harvest(_request(layer=2, n_tokens=40), root, lm=tiny_lm)
    assert first.cache.path != second.cache.path
    assert not second.reused
    assert not torch.equal(first.cache.load_all(), second.cache.load_all())
    for result in (first, second):
        run = mlflow.get_run(result.harvest_run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [first.cache.path.name, second.cache.path.name]
    )


def test_cache_key_is_stable_and_sensitive() -> None:
    request = _request()
    assert cache_key(request, "fp") == cache_key(_request(), "fp")
    assert len(cache_key(request, "fp")) == 64
    assert cache_key(request, "fp") != cache_key(request, "other corpus")
    for change in (
        {"layer": 2},
        {"n_tokens": 501},
        {"exclude_first_position": False},
        {"dtype": "float16"},
    ):
        assert cache_key(dataclasses.replace(request, **change), "fp") != cache_key(request, "fp")


def test_cache_key_names_the_corpus_region(monkeypatch: pytest.MonkeyPatch) -> None:
    # Caches written before the harvest/eval split saw the whole corpus: their key must differ.
    before = cache_key(_request(), "fp")
    monkeypatch.setattr(activation_cache, "region_rule", lambda: "another-rule")
    assert cache_key(_request(), "fp") != before


def test_harvest_windows_hold_no_eval_region_text(
    tiny_lm: LoadedLM, tracking_uri: str, root: Path, tmp_path: Path
) -> None:
    # Each document carries a unique marker word, so any eval document in a window shows.
    docs = [f"Document marker{i:03d} describes quiet gardens and rivers." for i in range(120)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    eval_markers = [f"marker{i:03d}" for i, d in enumerate(docs) if region_of(d) == "eval"]
    assert 15 < len(eval_markers) < 50
    request = _request(corpus=str(corpus), n_tokens=300, context_size=16)
    spec = resolve_corpus(str(corpus))
    windows_WT = activation_cache._tokenize_windows(request, spec, tiny_lm)
    text = tiny_lm.tokenizer.decode(windows_WT.flatten().tolist())
    assert "marker000" in text or "marker001" in text  # the windows do hold corpus text
    assert not [m for m in eval_markers if m in text]
    # The harvest itself reads those windows: its activations match them.
    result = harvest(request, root, lm=tiny_lm)
    assert result.cache.metadata["corpus_region"].startswith("harvest:")
    expected_ND = residual_activations(tiny_lm, windows_WT, 1)[:, 1:].reshape(-1, 64)
    torch.testing.assert_close(result.cache.load_all(), expected_ND[:300], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_tokens": 0}, "n_tokens must be positive, got 0"),
        ({"context_size": 1}, "context_size must be an integer >= 2"),
        ({"layer": -1}, "layer must be an integer >= 0"),
        ({"dtype": "int8"}, "dtype 'int8' is not one of float32, float16, bfloat16"),
        ({"model": ""}, "model must be a non-empty"),
    ],
)
def test_invalid_requests_fail_before_any_work(
    overrides: dict, message: str, tracking_uri: str, root: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        harvest(_request(**overrides), root)
    assert _runs() == [] and not root.exists()


def test_bad_layer_lm_mismatch_and_small_corpus_fail_clearly(
    tiny_lm: LoadedLM, tracking_uri: str, root: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="layer 4 is out of range for tiny-random-llama"):
        harvest(_request(layer=4), root, lm=tiny_lm)
    with pytest.raises(ValueError, match="the LM passed in is 'tiny-random-llama'"):
        harvest(_request(model="other-model"), root, lm=tiny_lm)
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": "Only a few words of text here."}) + "\n")
    with pytest.raises(ValueError, match="yields only 0 tokens.*fewer than n_tokens=500"):
        harvest(_request(corpus=str(small)), root, lm=tiny_lm)
    assert _runs() == [] and not root.exists()


def test_interrupted_harvest_leaves_no_cache(
    tiny_lm: LoadedLM, tracking_uri: str, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = activation_cache.residual_activations

    def failing(*args: object, **kwargs: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt  # what an interrupted harvest raises
        return real(*args, **kwargs)

    monkeypatch.setattr(activation_cache, "residual_activations", failing)
    with pytest.raises(KeyboardInterrupt):
        # shard_bytes small enough that a shard is written before the interruption
        harvest(_request(), root, lm=tiny_lm, batch_size=2, shard_bytes=64 * 4 * 10)
    assert list(root.iterdir()) == []  # not even a temp dir
    (run,) = _runs()
    assert run.info.status in ("FAILED", "KILLED")

    monkeypatch.setattr(activation_cache, "residual_activations", real)
    result = harvest(_request(), root, lm=tiny_lm)
    assert not result.reused and result.cache.n_tokens == N_TOKENS


@pytest.fixture
def sharded_cache(tiny_lm: LoadedLM, tracking_uri: str, root: Path) -> ActivationCache:
    # 97 rows per shard: shards do not divide the batch size, so batches straddle shards.
    return harvest(_request(), root, lm=tiny_lm, shard_bytes=64 * 4 * 97).cache


@pytest.mark.parametrize("max_resident_shards", [None, 2])
def test_iter_batches_covers_every_token_once(
    sharded_cache: ActivationCache, max_resident_shards: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if max_resident_shards is not None:  # force the shard-group path
        monkeypatch.setattr(
            activation_cache, "MAX_RESIDENT_BYTES", 64 * 4 * 97 * max_resident_shards
        )
    all_ND = sharded_cache.load_all()
    assert len(sharded_cache.shard_paths) == 6

    def sorted_rows(acts_ND: torch.Tensor) -> torch.Tensor:
        return acts_ND[torch.argsort(acts_ND[:, 0])]

    for seed in (0, 1):
        batches = list(sharded_cache.iter_batches(64, seed=seed))
        assert [b.shape[0] for b in batches] == [64] * 7 + [52]
        epoch_ND = torch.cat(batches)
        assert not torch.equal(epoch_ND, all_ND)  # shuffled
        assert torch.equal(sorted_rows(epoch_ND), sorted_rows(all_ND))  # each row exactly once
    first = torch.cat(list(sharded_cache.iter_batches(64, seed=0)))
    assert torch.equal(first, torch.cat(list(sharded_cache.iter_batches(64, seed=0))))
    assert not torch.equal(first, torch.cat(list(sharded_cache.iter_batches(64, seed=1))))

    ordered = list(sharded_cache.iter_batches(64, shuffle=False, drop_last=True))
    assert len(ordered) == 7 and torch.equal(torch.cat(ordered), all_ND[: 7 * 64])


def test_float16_storage_and_reopen(tiny_lm: LoadedLM, tracking_uri: str, root: Path) -> None:
    request = _request(dtype="float16", exclude_first_position=False, n_tokens=64)
    result = harvest(request, root, lm=tiny_lm)
    reopened = ActivationCache(result.cache.path)
    assert reopened.load_all().dtype == torch.float16
    assert reopened.metadata["exclude_first_position"] is False
    with pytest.raises(ValueError, match="not a complete activation cache"):
        ActivationCache(root / "missing")


def test_s3_round_trip(
    s3_env: str,
    tiny_lm: LoadedLM,
    tracking_uri: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = f"s3://saeflow-test/{tmp_path.name}/caches"
    monkeypatch.setenv("SAEFLOW_CACHE_DIR", str(tmp_path / "machine-a"))
    first = harvest(_request(), root, lm=tiny_lm, shard_bytes=64 * 4 * 200)
    assert not first.reused
    key = first.cache.path.name
    assert first.cache.metadata["uri"] == f"{root}/{key}"
    s3 = boto3.client("s3", endpoint_url=s3_env)
    listed = s3.list_objects_v2(Bucket="saeflow-test", Prefix=f"{tmp_path.name}/caches/{key}/")
    names = sorted(obj["Key"].rsplit("/", 1)[1] for obj in listed["Contents"])
    assert names == ["metadata.json", *(p.name for p in first.cache.shard_paths)]

    # Another machine (an empty local cache) reuses the remote entry: download, no new run.
    monkeypatch.setenv("SAEFLOW_CACHE_DIR", str(tmp_path / "machine-b"))
    second = harvest(_request(), root, lm=tiny_lm)
    assert second.reused and second.harvest_run_id == first.harvest_run_id
    assert second.cache.path.is_relative_to(tmp_path / "machine-b" / "s3-mirror")
    assert torch.equal(second.cache.load_all(), first.cache.load_all())
    assert len(_runs()) == 1
