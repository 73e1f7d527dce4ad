"""Harvest residual-stream activations once, reuse them for every SAE and evaluation.

A cache entry is a directory `<cache_root>/<cache_key>/` holding sharded safetensors files
(`shard_00000.safetensors`, one tensor "activations" [n, d_in] each) and `metadata.json`. The
entry is written into a temp directory and renamed into place, with metadata.json last, so a
directory with metadata.json is complete and an interrupted harvest leaves nothing behind.

`cache_root` may also be `s3://bucket/prefix`: the harvest writes a local mirror under
`saeflow_cache_dir()/s3-mirror/` and uploads it (metadata.json last); a later harvest of the
same request finds the remote metadata.json and downloads the shards into the mirror once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from project.corpus import (
    DEFAULT_CORPUS,
    CorpusSpec,
    corpus_fingerprint,
    iter_texts,
    region_rule,
    resolve_corpus,
    stdlib_dir,
    token_windows,
)
from project.fsutil import atomic_write_dir
from project.lm import (
    LoadedLM,
    canonical_model_name,
    check_layer,
    hook_name,
    load_lm,
    residual_activations,
    saeflow_cache_dir,
)

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SHARD_BYTES = 64 * 2**20
ACTIVATIONS_KEY = "activations"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# iter_batches keeps at most this many bytes of shards in memory at once.
MAX_RESIDENT_BYTES = 1 << 30


@dataclass(frozen=True, kw_only=True)
class HarvestRequest:
    """What to harvest: `n_tokens` activations of `model` after block `layer` on `corpus`.

    `exclude_first_position` drops position 0 of every window: it holds the BOS / attention-sink
    token whose residual norm is an order of magnitude above the rest (SAELens excludes it
    too). The LM runs in float32; `dtype` is the storage dtype of the cached activations.
    """

    model: str
    layer: int
    n_tokens: int
    corpus: str = DEFAULT_CORPUS
    text_column: str = "text"
    split: str = "train"
    context_size: int = 128
    dtype: str = "float32"
    exclude_first_position: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the bad field, its value and what is valid."""
        if not self.model or not self.model.strip():
            raise ValueError("model must be a non-empty LM name")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be an integer >= 0, got {self.layer!r}")
        if isinstance(self.n_tokens, bool) or not isinstance(self.n_tokens, int):
            raise ValueError(f"n_tokens must be an integer, got {self.n_tokens!r}")
        if self.n_tokens <= 0:
            raise ValueError(f"n_tokens must be positive, got {self.n_tokens}")
        if not isinstance(self.context_size, int) or self.context_size < 2:
            raise ValueError(f"context_size must be an integer >= 2, got {self.context_size!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not self.corpus or not self.text_column:
            raise ValueError("corpus and text_column must be non-empty")

    @property
    def tokens_per_window(self) -> int:
        return self.context_size - 1 if self.exclude_first_position else self.context_size


def cache_key(request: HarvestRequest, corpus_fingerprint: str) -> str:
    """sha256 of the canonical JSON of the request, the corpus fingerprint, the corpus region
    rule (a harvest reads only the "harvest" region; caches from before the split, which saw the
    whole corpus, miss) and the format."""
    payload = {
        "format_version": CACHE_FORMAT_VERSION,
        "request": asdict(request),
        "corpus_fingerprint": corpus_fingerprint,
        "corpus_region": f"harvest:{region_rule()}",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ActivationCache:
    """A complete cache entry on local disk (for an S3 cache: its local mirror)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / METADATA_FILE
        if not meta_path.is_file():
            raise ValueError(f"{self.path} is not a complete activation cache: no {METADATA_FILE}")
        self.metadata: dict[str, Any] = json.loads(meta_path.read_text())
        self._resident: Tensor | None = None

    def __repr__(self) -> str:
        return f"ActivationCache({str(self.path)!r}, n_tokens={self.n_tokens}, d_in={self.d_in})"

    @property
    def directory(self) -> Path:
        """Alias of `path`: the local directory holding the shards and metadata.json."""
        return self.path

    @property
    def d_in(self) -> int:
        return int(self.metadata["d_in"])

    @property
    def n_tokens(self) -> int:
        return int(self.metadata["n_tokens"])

    @property
    def hook_name(self) -> str:
        return str(self.metadata["hook_name"])

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / shard["file"] for shard in self.metadata["shards"]]

    def _load_shard(self, index: int) -> Tensor:
        return load_file(self.shard_paths[index])[ACTIVATIONS_KEY]

    def load_all(self) -> Tensor:
        """All activations, [n_tokens, d_in], in harvest order and the stored dtype.

        Caches under MAX_RESIDENT_BYTES stay in memory after the first call and the same tensor
        is returned each time: do not modify it in place.
        """
        if self._resident is None:
            acts_ND = torch.cat([self._load_shard(i) for i in range(len(self.shard_paths))])
            if self._total_bytes() > MAX_RESIDENT_BYTES:
                return acts_ND  # too big to keep around between epochs
            self._resident = acts_ND
        return self._resident

    def _total_bytes(self) -> int:
        itemsize = DTYPES[self.metadata["dtype"]].itemsize
        return self.n_tokens * self.d_in * itemsize

    def iter_batches(
        self, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> Iterator[Tensor]:
        """Batches [B, d_in] covering every activation exactly once.

        Shuffling permutes the shard order, then the rows of a group of shards held in memory
        together (all of them when the cache is under MAX_RESIDENT_BYTES); leftover rows of a
        group are carried into the next, so every batch but the last has `batch_size` rows.
        Pass a different `seed` per epoch for a different order.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        generator = torch.Generator().manual_seed(seed)
        n_shards = len(self.shard_paths)
        shard_bytes = max(1, self._total_bytes() // max(1, n_shards))
        per_group = max(1, min(n_shards, MAX_RESIDENT_BYTES // shard_bytes))
        order = torch.randperm(n_shards, generator=generator).tolist() if shuffle else None
        groups: list[list[int]]
        if per_group >= n_shards:
            groups = [list(range(n_shards))]
        else:
            shard_order = order if order is not None else list(range(n_shards))
            groups = [shard_order[i : i + per_group] for i in range(0, n_shards, per_group)]

        carry_BD: Tensor | None = None
        for group in groups:
            if len(groups) == 1:
                acts_ND = self.load_all()
            else:
                acts_ND = torch.cat([self._load_shard(i) for i in group])
            if shuffle:
                acts_ND = acts_ND[torch.randperm(acts_ND.shape[0], generator=generator)]
            elif acts_ND is self._resident:
                acts_ND = acts_ND.clone()  # batches are views: keep the resident copy safe
            if carry_BD is not None:
                acts_ND = torch.cat([carry_BD, acts_ND])
            n_full = acts_ND.shape[0] // batch_size * batch_size
            for start in range(0, n_full, batch_size):
                yield acts_ND[start : start + batch_size]
            carry_BD = acts_ND[n_full:] if n_full < acts_ND.shape[0] else None
        if carry_BD is not None and not drop_last:
            yield carry_BD


@dataclass
class HarvestResult:
    """The cache, the MLflow run that computed it, and whether it already existed."""

    cache: ActivationCache
    harvest_run_id: str | None
    reused: bool


# ---------------------------------------------------------------------------------------------
# S3


def _is_s3(root: str | Path) -> bool:
    return isinstance(root, str) and root.startswith("s3://")


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"cache root {uri!r} has no bucket; expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def _s3_client() -> Any:  # a botocore S3 client
    import boto3

    # MLflow's variable first, so one setting serves artifacts and caches alike.
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint or None)


def _s3_object_key(prefix: str, key: str, name: str) -> str:
    return "/".join(p for p in (prefix, key, name) if p)


def _s3_exists(client: Any, bucket: str, object_key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=object_key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def _s3_mirror_dir(uri: str, key: str) -> Path:
    bucket, prefix = _split_s3(uri)
    return saeflow_cache_dir() / "s3-mirror" / bucket / prefix / key


def _s3_upload(client: Any, local: Path, uri: str, key: str) -> None:
    bucket, prefix = _split_s3(uri)
    cache = ActivationCache(local)
    # metadata.json last: its presence is what marks the remote entry complete.
    for path in [*cache.shard_paths, local / METADATA_FILE]:
        client.upload_file(str(path), bucket, _s3_object_key(prefix, key, path.name))
    logger.info("uploaded activation cache %s to %s/%s", local, uri.rstrip("/"), key)


def _s3_download(client: Any, uri: str, key: str, local: Path) -> None:
    bucket, prefix = _split_s3(uri)

    def write(tmp: Path) -> None:
        meta_file = tmp / METADATA_FILE
        client.download_file(bucket, _s3_object_key(prefix, key, METADATA_FILE), str(meta_file))
        shards = json.loads(meta_file.read_text())["shards"]
        for shard in tqdm(shards, desc="downloading activation shards", unit="shard"):
            client.download_file(
                bucket, _s3_object_key(prefix, key, shard["file"]), str(tmp / shard["file"])
            )

    atomic_write_dir(local, write, lambda d: (d / METADATA_FILE).is_file())


# ---------------------------------------------------------------------------------------------
# harvest


def _dataset_for(spec: CorpusSpec, fingerprint: str) -> mlflow.data.meta_dataset.MetaDataset:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    if spec.kind == "hub":
        source = HuggingFaceDatasetSource(
            path=spec.source, config_name=spec.config_name, split=spec.split
        )
    else:
        location = str(stdlib_dir()) if spec.kind == "stdlib" else spec.source
        with warnings.catch_warnings():
            # Two registered local sources match a plain path; MLflow warns and picks one.
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(location)
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    name = "stdlib" if spec.kind == "stdlib" else Path(spec.source).name or spec.source
    return MetaDataset(source, name=name, digest=digest)


def _tokenize_windows(request: HarvestRequest, spec: CorpusSpec, lm: LoadedLM) -> Tensor:
    """All windows the harvest needs, [W, T]; raises ValueError if the corpus is too small."""
    n_windows = math.ceil(request.n_tokens / request.tokens_per_window)
    windows = list(
        tqdm(
            token_windows(
                iter_texts(spec, "harvest"),  # never the eval region the evals read
                lm.tokenizer,
                request.context_size,
                n_windows * request.context_size,
            ),
            total=n_windows,
            desc="tokenising corpus",
            unit="window",
        )
    )
    if len(windows) < n_windows:
        available = len(windows) * request.tokens_per_window
        raise ValueError(
            f"corpus {request.corpus!r} yields only {available} tokens in windows of "
            f"{request.context_size}, fewer than n_tokens={request.n_tokens}; lower n_tokens "
            "or use a larger corpus"
        )
    return torch.stack(windows)


def _compute_shards(
    request: HarvestRequest,
    lm: LoadedLM,
    windows_WT: Tensor,
    out_dir: Path,
    batch_size: int,
    shard_bytes: int,
) -> tuple[list[dict[str, Any]], float]:
    """Run the LM to the hook in batches and write shards; returns (shard list, seconds)."""
    dtype = DTYPES[request.dtype]
    rows_per_shard = max(1, shard_bytes // (lm.d_model * dtype.itemsize))
    first = 1 if request.exclude_first_position else 0
    shards: list[dict[str, Any]] = []
    pending: list[Tensor] = []
    n_pending = n_done = 0

    def flush(final: bool) -> None:
        nonlocal pending, n_pending
        acts_ND = torch.cat(pending) if pending else torch.empty(0, lm.d_model, dtype=dtype)
        while acts_ND.shape[0] >= rows_per_shard or (final and acts_ND.shape[0] > 0):
            shard_ND = acts_ND[:rows_per_shard].contiguous()
            acts_ND = acts_ND[rows_per_shard:]
            name = f"shard_{len(shards):05d}.safetensors"
            save_file({ACTIVATIONS_KEY: shard_ND}, str(out_dir / name))
            shards.append({"file": name, "n_tokens": int(shard_ND.shape[0])})
        pending = [acts_ND] if acts_ND.shape[0] else []
        n_pending = acts_ND.shape[0]

    started = time.perf_counter()
    with tqdm(
        total=request.n_tokens, desc=f"harvesting {hook_name(request.layer)}", unit="tok"
    ) as bar:
        for start in range(0, windows_WT.shape[0], batch_size):
            input_ids_BT = windows_WT[start : start + batch_size]
            acts_BTD = residual_activations(lm, input_ids_BT, request.layer)
            acts_ND = acts_BTD[:, first:].reshape(-1, lm.d_model).to(dtype)
            acts_ND = acts_ND[: request.n_tokens - n_done]
            pending.append(acts_ND.cpu())
            n_pending += acts_ND.shape[0]
            n_done += acts_ND.shape[0]
            bar.update(acts_ND.shape[0])
            if n_pending >= rows_per_shard:
                flush(final=False)
    flush(final=True)
    return shards, time.perf_counter() - started


def harvest(
    request: HarvestRequest,
    cache_root: str | Path,
    *,
    lm: LoadedLM | None = None,
    batch_size: int = 16,
    shard_bytes: int = SHARD_BYTES,
) -> HarvestResult:
    """Return the activation cache for `request`, computing it only if no complete one exists.

    A new harvest is logged as an MLflow run (nested under the active run if any; tag
    `saeflow.run_type=harvest`) with the request as params, the corpus as a logged input
    (context "harvest"), n_tokens and tokens_per_second as metrics and the cache key and
    location as tags. A reused cache starts no run and reports the original run id.

    Args:
        request: what to harvest; validated before any work.
        cache_root: a local directory or `s3://bucket/prefix`.
        lm: an already loaded LM whose `name` matches `request.model` (else it is loaded).
        batch_size: windows per LM forward pass (16 x 128 tokens ran ~1.5x faster than 8 on
            the 2-core CPU for SmolLM2).
        shard_bytes: approximate size of one safetensors shard.
    """
    request.validate()
    request = replace(request, model=canonical_model_name(request.model))
    if lm is not None and lm.name != request.model:
        raise ValueError(
            f"the LM passed in is {lm.name!r} but the request names {request.model!r}; "
            "the cache key must describe the model that produced the activations"
        )
    spec = resolve_corpus(request.corpus, request.text_column, request.split)
    # A local corpus is keyed by its absolute path, so "./data" and "/abs/data" share a cache.
    request = replace(request, corpus=spec.source)
    fingerprint = corpus_fingerprint(spec)
    key = cache_key(request, fingerprint)

    remote = _is_s3(cache_root)
    client = _s3_client() if remote else None
    local = _s3_mirror_dir(str(cache_root), key) if remote else Path(cache_root).resolve() / key
    uri = f"{str(cache_root).rstrip('/')}/{key}" if remote else str(local)

    if remote:
        bucket, prefix = _split_s3(str(cache_root))
        if _s3_exists(client, bucket, _s3_object_key(prefix, key, METADATA_FILE)):
            if not (local / METADATA_FILE).is_file():
                _s3_download(client, str(cache_root), key, local)
            return _reused(local)
        if (local / METADATA_FILE).is_file():
            # Computed before but the upload did not finish: upload, don't recompute.
            _s3_upload(client, local, str(cache_root), key)
            return _reused(local)
    elif (local / METADATA_FILE).is_file():
        return _reused(local)

    if lm is None:
        lm = load_lm(request.model)
    check_layer(lm, request.layer)
    windows_WT = _tokenize_windows(request, spec, lm)

    active = mlflow.active_run()
    run_name = f"harvest-{Path(request.model).name}-L{request.layer}"
    tags = {
        "saeflow.run_type": "harvest",
        "saeflow.cache_key": key,
        "saeflow.cache_uri": uri,
    }
    with mlflow.start_run(run_name=run_name, nested=active is not None, tags=tags) as run:
        params = {**asdict(request), "hook_name": hook_name(request.layer), "d_in": lm.d_model}
        mlflow.log_params(params)
        mlflow.log_input(_dataset_for(spec, fingerprint), context="harvest")

        def write(tmp: Path) -> None:
            shards, seconds = _compute_shards(request, lm, windows_WT, tmp, batch_size, shard_bytes)
            metadata = {
                **asdict(request),
                "format_version": CACHE_FORMAT_VERSION,
                "cache_key": key,
                "uri": uri,
                "corpus_fingerprint": fingerprint,
                "corpus_region": f"harvest:{region_rule()}",
                "model_name": lm.name,
                "hook_name": hook_name(request.layer),
                "d_in": lm.d_model,
                "n_windows": int(windows_WT.shape[0]),
                "harvest_run_id": run.info.run_id,
                "tokens_per_second": request.n_tokens / seconds,
                "harvest_seconds": seconds,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "shards": shards,
            }
            # Written last: a directory with metadata.json is a complete cache.
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2))

        atomic_write_dir(local, write, lambda d: (d / METADATA_FILE).is_file())
        cache = ActivationCache(local)
        if remote:
            _s3_upload(client, local, str(cache_root), key)
        mlflow.log_metrics(
            {"n_tokens": cache.n_tokens, "tokens_per_second": cache.metadata["tokens_per_second"]}
        )
    logger.info(
        "harvested %d activations of %s at %s (%.0f tok/s) into %s",
        cache.n_tokens,
        lm.name,
        cache.hook_name,
        cache.metadata["tokens_per_second"],
        uri,
    )
    return HarvestResult(cache=cache, harvest_run_id=run.info.run_id, reused=False)


def _reused(local: Path) -> HarvestResult:
    cache = ActivationCache(local)
    logger.info("reusing activation cache %s (%d tokens)", local, cache.n_tokens)
    return HarvestResult(
        cache=cache, harvest_run_id=cache.metadata.get("harvest_run_id"), reused=True
    )
