"""Offline 0/1/2 ratings of a steered continuation on AxBench's three scales (METHODS §3).

What each rating is computed from (issue 13):

- **concept** (is the concept clearly present): the largest cosine similarity between the
  concept description and any single content word of the text, each embedded alone with the
  packaged all-MiniLM-L6-v2. A concept is there when one of its words (or a close one:
  "melody" for music, "planet" for space) is; a text that is merely on a neighbouring topic has
  no such word, so it does not earn credit the way a whole-text similarity would.
  A token-list explanation (the offline explainer's ``" then", " next" (context: ...)``) is
  read as the explainer wrote it (issue 18): its tokens are evidence only where they are
  *informative*, i.e. found as written in at most ``max_token_window_share`` (20%) of random
  reference windows (``"or"``, ``" the"``, ``"y"`` are in most text, so they say nothing about
  a latent). An informative token found in the text as written, case and leading space kept,
  scores 1 (``"OF"`` of a latent about EOFError is not the "of" of "the area of a circle";
  ``" order"`` is in "keeping the order"). Otherwise the word rule above applies to the
  explanation with its uninformative tokens removed (its informative tokens and context
  words), and to nothing (score 0) when no informative token and no context is left.
- **instruct** (is the text on the instruction's topic): cosine similarity of the whole text and
  the instruction, minus that instruction's mean similarity to the calibration completions
  written for other instructions (what unrelated text already scores against it). Text that is
  mostly non-words or symbols answers nothing: instruct 0.
- **fluency** (well-formed language; loops and non-words are 0): a score from lexical
  statistics, minus the unsteered LM's surprisal where an LM is given —
  ``-(4·loop + 4·non_words + 2·symbols)``, where ``loop`` is the larger of the share of word
  trigrams that repeat an earlier one and how far zlib compresses the text beyond ordinary
  prose, ``non_words`` the share of whitespace tokens that are neither numbers nor words of
  the embedding model's vocabulary (22k English words, simple inflections allowed), ``symbols``
  the share of tokens with no letter or digit; with an LM, ``- 0.25·max(0, NLL - 2.5)`` where
  NLL is the LM's mean per-token negative log-likelihood of the text (nats). Perplexity alone
  rewards predictable loops, which is why it only refines the lexical score.

Each score is cut into 0/1/2 at two thresholds fit (best accuracy) on the labelled examples in
``calibration.json``: short completions written for saeflow and rated by careful reading,
none taken from any benchmark file. The cuts are fit with the judge's own LM, so the fluency
cuts match the LM's scale, once per judge identity and LM weights (kept in memory and in
``$SAEFLOW_CACHE_DIR/judge_cuts``). Empty text rates 0 on every scale. Many ratings at once
(:meth:`OfflineRater.rate_many`) batch the embeddings and the LM's passes, same ratings; with
``screen_fluency``, a bfloat16 copy of the LM settles the fluency ratings its NLL decides within
a measured bound, and the float32 pass rates the rest.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import os
import re
import zlib
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from project.lm import LoadedLM

logger = logging.getLogger(__name__)

# Bumped whenever a formula below changes: part of the judge's identity. 5: token-list
# explanations match as written and only through informative tokens (issue 18). 6: a token
# never matches inside a longer word.
RATING_RULE_VERSION = "6"
# An explanation token found in more than this share of random reference windows is no
# evidence of a latent's concept (issue 18).
DEFAULT_MAX_TOKEN_WINDOW_SHARE = 0.2
CALIBRATION_FILE = "calibration.json"
_PUNCT = " .,;:!?\"'()[]{}*_`“”‘’-–—…#<>|/\\~"
_ALPHA_RE = re.compile(r"[A-Za-z]+(?:['’-][A-Za-z]+)*")
_NUMBER_RE = re.compile(r"[\d.,%/:$+=x-]*\d[\d.,%/:$+=x-]*")
_CONTENT_RE = re.compile(r"[A-Za-z]{3,}")
_QUOTED_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
_SUFFIXES = ("s", "es", "ed", "d", "ing", "ly", "er", "ers", "est", "ies", "ied")
# Ordinary prose compresses to ~0.6-0.75 of its bytes with zlib; a loop to far less.
_PROSE_COMPRESSION = 0.55
_MIN_COMPRESS_BYTES = 60
# Mean NLL (nats/token) of fluent text under a small chat LM sits around 2-3.
_NLL_FREE = 2.5
# Tokens per batch of the fluency LM's NLL pass (logits of [tokens, vocab] in float32).
_NLL_BATCH_TOKENS = 2048
# How far a bfloat16 copy of the fluency LM's mean NLL of an n-token text may lie from the
# float32 one for the screen to trust it: SCALE / sqrt(n) nats. Measured on SmolLM2 (issue 19),
# the largest gap times sqrt(n) was 0.26 over 323 steered and unsteered completions and their
# 2-8 word prefixes, and 0.48 on the calibration texts' halves and five-word prefixes (the test
# checks those); the bound is three times the larger. It never falls below _SCREEN_NLL_FLOOR,
# three times the largest gap of a 24-token text (0.048), in case the gap of a long text stops
# shrinking (texts past 24 tokens were not measured). Over the 323 texts it settles 77% of the
# fluency ratings; the rest take the float32 pass. The ratings are the float32 ones wherever
# the gap lies within the bound: measured, not proven.
_SCREEN_NLL_SCALE = 1.5
_SCREEN_NLL_FLOOR = 0.15
# Fitted cuts per (OfflineRater.cuts_key, kind): fit once per process for each kind of judge.
_CUTS: dict[tuple[str, str], tuple[float, float, float]] = {}
_STOPWORDS = frozenset(
    """the and for are but not you your with this that these those from have has had was were
    been being its their them they his her she him our who whom what which when where why how
    all any can could will would should may might must shall into onto than then there here
    also just very more most some such only own same other each both few many much one two
    three first about after before over under again once out off too does did doing done""".split()  # noqa: SIM905
)


def nll_token_ids(lm: LoadedLM, text: str) -> list[int]:
    """The tokens the fluency LM's NLL pass runs for ``text``: BOS, then at most 256."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:256]
    bos = lm.tokenizer.bos_token_id
    return [bos, *ids] if bos is not None else ids


def _nll_batch(
    model: torch.nn.Module, device: Any, batch: list[str], encoded: dict[str, list[int]]
) -> dict[str, tuple[float, int]]:
    """(mean NLL, tokens scored) of each text of ``batch`` in one right-padded forward (not
    finite where the logits overflowed)."""
    width = max(len(encoded[t]) for t in batch)
    ids_BT = torch.zeros(len(batch), width, dtype=torch.long)
    mask_BT = torch.zeros(len(batch), width, dtype=torch.long)
    for b, text in enumerate(batch):
        ids = encoded[text]
        ids_BT[b, : len(ids)] = torch.tensor(ids)
        mask_BT[b, : len(ids)] = 1
    ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
    logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT).logits.float()
    # Position t predicts token t + 1; the last position and padding predict nothing. The
    # logits stay [B·T, V] as computed: cross-entropy over a transposed [B, V, T] view is
    # 2.6x slower and drifts ~1e-4 nats from the float64 value (this layout: ~1e-5).
    targets_BT = torch.full_like(ids_BT, -100)
    targets_BT[:, :-1] = ids_BT[:, 1:].masked_fill(mask_BT[:, 1:] == 0, -100)
    batch_size, width = ids_BT.shape
    nll_BT = torch.nn.functional.cross_entropy(
        logits_BTV.view(batch_size * width, -1),
        targets_BT.view(-1),
        ignore_index=-100,
        reduction="none",
    ).view(batch_size, width)
    counts_B = mask_BT[:, 1:].sum(dim=1)
    found = {}
    for text, total, count in zip(batch, nll_BT.sum(dim=1), counts_B, strict=True):
        found[text] = (float(total) / int(count), int(count))
    return found


@functools.lru_cache(maxsize=4)
def load_lexicon(vocab_path: str) -> frozenset[str]:
    """Lower-case whole English words of a WordPiece ``vocab.txt`` (the embedding model's)."""
    words = set()
    for line in Path(vocab_path).read_text(encoding="utf-8").splitlines():
        if re.fullmatch(r"[a-z]+", line) and (len(line) > 1 or line in "ai"):
            words.add(line)
    return frozenset(words)


def _known(word: str, lexicon: frozenset[str]) -> bool:
    word = word.lower()
    if word in lexicon:
        return True
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            stem = word[: -len(suffix)]
            if stem in lexicon or stem + "e" in lexicon or stem + "y" in lexicon:
                return True
    return False


@dataclass(frozen=True)
class TextStats:
    """Lexical statistics of a text (shares of its whitespace tokens unless said otherwise)."""

    n_tokens: int
    non_words: float
    symbols: float
    repeated_trigrams: float
    compression: float  # zlib-compressed bytes / bytes (1.0 for texts too short to tell)

    @property
    def loop(self) -> float:
        """How loop-like the text is: repeated trigrams, or compressibility beyond prose."""
        excess = max(0.0, _PROSE_COMPRESSION - self.compression) / _PROSE_COMPRESSION
        return max(self.repeated_trigrams, excess)


def text_stats(text: str, lexicon: frozenset[str]) -> TextStats:
    """Non-word, symbol and repetition statistics of ``text`` (see the module docstring)."""
    tokens = text.split()
    non_words = symbols = 0
    words: list[str] = []
    for token in tokens:
        core = token.strip(_PUNCT)
        if not core:
            symbols += 1
            continue
        if _ALPHA_RE.fullmatch(core):
            # Hyphenated and elided words: the first part decides ("self-care", "it's"); an
            # unknown capitalised word is a name ("Erebus"), not a non-word.
            head = re.split(r"['’-]", core)[0]
            is_name = head[:1].isupper() and head[1:].islower()
            if not (len(head) <= 1 or is_name or _known(head, lexicon)):
                non_words += 1
            words.append(core.lower())
        elif not _NUMBER_RE.fullmatch(core):
            non_words += 1  # letters glued to digits or symbols: "the1", "is=zero:one"
    n = max(1, len(tokens))
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    repeated = 1.0 - len(set(trigrams)) / len(trigrams) if len(trigrams) >= 4 else 0.0
    raw = text.encode("utf-8")
    compression = len(zlib.compress(raw, 9)) / len(raw) if len(raw) >= _MIN_COMPRESS_BYTES else 1.0
    return TextStats(len(tokens), non_words / n, symbols / n, repeated, compression)


def content_words(text: str) -> list[str]:
    """Distinct lower-case words of three letters or more, stop words dropped, in order."""
    seen: dict[str, None] = {}
    for word in _CONTENT_RE.findall(text):
        word = word.lower()
        if word not in _STOPWORDS:
            seen.setdefault(word, None)
    return list(seen)


def explanation_tokens(concept: str) -> list[str]:
    """The JSON-quoted tokens of a token-list explanation (the offline explainer's form,
    ``" then", " next" (context: ...)``), as written: case and leading space kept; empty for a
    concept in prose."""
    head = concept.split(" (context:")[0].strip()
    if not head.startswith('"'):
        return []
    tokens: list[str] = []
    for match in _QUOTED_RE.findall(head):
        try:
            token = json.loads(match)
        except ValueError:
            continue
        if isinstance(token, str) and token and token not in tokens:
            tokens.append(token)
    return tokens


def explanation_context(concept: str) -> str:
    """The ``(context: ...)`` part of a token-list explanation, or "" where it has none."""
    at = concept.find(" (context:")
    return concept[at + 1 :].strip() if at >= 0 else ""


def token_in_text(token: str, text: str) -> bool:
    """Whether ``text`` contains ``token`` as written — case and leading space kept — and not
    inside a longer word: where the token begins or ends with a letter or digit, the text's
    character beside it is neither (rule 6). A latent's token ``"F"`` is not in "Feathers",
    ``"1"`` not in "16", ``" on"`` not in " only": read in the steered completions of a default
    study, such in-word matches were most of what rule 5 credited. The explainer's windows show
    newlines as ↵; a completion has them."""
    needle = token.replace("↵", "\n")
    return bool(needle) and _token_pattern(needle).search(text) is not None


@functools.lru_cache(maxsize=4096)
def _token_pattern(needle: str) -> re.Pattern[str]:
    word_char = r"[^\W_]"  # a letter or digit, any script
    left = f"(?<!{word_char})" if needle[0].isalnum() else ""
    right = f"(?!{word_char})" if needle[-1].isalnum() else ""
    return re.compile(left + re.escape(needle) + right)


def token_list_description(tokens: Sequence[str], context: str) -> str:
    """A token-list explanation rebuilt from some of its tokens and its context part."""
    head = ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens)
    return f"{head} {context}".strip()


@dataclass(frozen=True)
class LabelledText:
    """One calibration example: a completion with its hand ratings."""

    concept: str
    instruction: str
    completion: str
    ratings: dict[str, int]


def calibration_path() -> Path:
    """``calibration.json`` inside the installed package."""
    return Path(str(resources.files("project.judges").joinpath(CALIBRATION_FILE)))


@functools.lru_cache(maxsize=1)
def calibration_examples() -> tuple[LabelledText, ...]:
    """The labelled completions written for saeflow (``calibration.json``)."""
    data = json.loads(calibration_path().read_text(encoding="utf-8"))
    return tuple(
        LabelledText(
            item["concept"],
            item["instruction"],
            item["completion"],
            {k: int(item[f"{k}_rating"]) for k in ("concept", "instruct", "fluency")},
        )
        for item in data["examples"]
    )


def calibration_hash() -> str:
    """Short hash of the calibration data and the rating rule's version."""
    digest = hashlib.sha256(calibration_path().read_bytes())
    digest.update(RATING_RULE_VERSION.encode())
    return digest.hexdigest()[:12]


def fit_three_levels(scores: Sequence[float], labels: Sequence[int]) -> tuple[float, float, float]:
    """Cuts t1 <= t2 mapping a score to 0 (< t1), 1 (< t2) or 2 with the best accuracy on the
    labelled examples (among equally good cuts, the midpoints between neighbouring scores
    closest to the middle); returns (t1, t2, training accuracy)."""
    s = torch.tensor(list(scores), dtype=torch.float64)
    y = torch.tensor(list(labels))
    values = s.unique().sort().values
    cuts = torch.cat([values[:1] - 1e-6, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-6])
    level = (s[None, :] >= cuts[:, None]).long()  # [C, N]
    best: tuple[float, float, float] = (float(cuts[0]), float(cuts[-1]), -1.0)
    for i in range(len(cuts)):
        predicted = level[i][None, :] + level[i:]  # cut j >= i
        accuracy = (predicted == y[None, :]).double().mean(dim=1)
        j = int(accuracy.argmax())
        if float(accuracy[j]) > best[2] + 1e-9:
            best = (float(cuts[i]), float(cuts[i + j]), float(accuracy[j]))
    return best


def _cuts_path(cuts_key: str) -> Path:
    from project.lm import saeflow_cache_dir

    digest = hashlib.sha256(cuts_key.encode()).hexdigest()[:32]
    return saeflow_cache_dir() / "judge_cuts" / f"{digest}.json"


def _stored_cuts(cuts_key: str, kind: str) -> tuple[float, float, float] | None:
    """The cuts a judge of the same key fit before: in this process, else in the user's cache
    (a deterministic fit on the same examples, embedding model and LM weights)."""
    if (cuts_key, kind) not in _CUTS:
        path = _cuts_path(cuts_key)
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if stored.get("key") != cuts_key or kind not in stored.get("cuts", {}):
            return None
        low, high, accuracy = (float(c) for c in stored["cuts"][kind])
        _CUTS[(cuts_key, kind)] = (low, high, accuracy)
    return _CUTS[(cuts_key, kind)]


def _store_cuts(cuts_key: str, kind: str, cuts: tuple[float, float, float]) -> None:
    _CUTS[(cuts_key, kind)] = cuts
    path = _cuts_path(cuts_key)
    known = {k: list(v) for (key, k), v in _CUTS.items() if key == cuts_key}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": cuts_key, "cuts": known}))
        os.replace(tmp, path)  # readers see a whole file or none
    except OSError as err:  # a read-only cache costs a refit next time, nothing else
        logger.warning("could not store the judge's cuts in %s: %s", path, err)


def three_level(score: float, cuts: tuple[float, float, float]) -> int:
    """0, 1 or 2 for a score and (t1, t2, _) cuts."""
    return int(score >= cuts[0]) + int(score >= cuts[1])


class OfflineRater:
    """The offline judge's ratings (module docstring); ``embed`` maps texts to unit vectors."""

    def __init__(
        self,
        embed: Callable[[Sequence[str]], Tensor],
        lexicon: frozenset[str],
        fluency_lm: LoadedLM | None = None,
        informative: Callable[[Sequence[str]], list[str]] | None = None,
        cuts_key: str | None = None,
        screen_fluency: bool = False,
    ) -> None:
        self.embed = embed
        # Keeps the explanation tokens that are evidence of a concept (the judge's reference
        # windows decide); None: every token is.
        self.informative = informative
        self.lexicon = lexicon
        self.fluency_lm = fluency_lm
        # The cuts depend only on what ``cuts_key`` names (embedding model, fluency LM,
        # calibration file, rule): judges built alike fit them once (memory, then disk).
        self.cuts_key = cuts_key
        self.cuts: dict[str, tuple[float, float, float]] = {}
        self._baselines: dict[str, float] = {}
        self._nll: dict[str, float] = {}  # float32, exact: what scores and cuts use
        # The screen (``screen_fluency``): a bfloat16 copy of the fluency LM, ~2.4x its float32
        # pass on an AMX CPU. Only a rating that the screened NLL settles within its bound
        # comes from it; the rest get the float32 NLL. The ratings are the float32 ones where
        # the gap lies within the bound (see _SCREEN_NLL_SCALE); scores are always float32.
        self.screen_fluency = screen_fluency and fluency_lm is not None
        self._screen_model: torch.nn.Module | None = None
        self._screened: dict[str, tuple[float, int]] = {}  # text: (bfloat16 NLL, tokens)
        self.screen_counts = {"settled": 0, "float32": 0}

    # ------------------------------------------------------------------ scores
    def concept_evidence(self, concept: str) -> tuple[list[str], str]:
        """(tokens, phrase): the explanation tokens whose presence as written is the concept's
        (its informative ones; none for a prose concept) and the phrase the text's words are
        compared with (the concept, or what is left of a token list once its common tokens
        are dropped: ``"OF"`` of EOFError would otherwise pull in every "of" text)."""
        tokens = explanation_tokens(concept)
        if not tokens:
            return [], concept
        kept = list(self.informative(tokens)) if self.informative is not None else tokens
        if len(kept) == len(tokens):
            return kept, concept
        return kept, token_list_description(kept, explanation_context(concept))

    def concept_score(self, text: str, concept: str) -> float:
        kept, phrase = self.concept_evidence(concept)
        if any(token_in_text(t, text) for t in kept):
            return 1.0  # the explanation's own token is in the text: cosine 1 with itself
        if not phrase:
            return 0.0
        words = content_words(text)
        if not words:
            return 0.0
        return float((self.embed(words) @ self.embed([phrase])[0]).max())

    def instruct_score(self, text: str, instruction: str) -> float:
        similarity = float(self.embed([text])[0] @ self.embed([instruction])[0])
        return similarity - self.instruction_baseline(instruction)

    def instruction_baseline(self, instruction: str) -> float:
        """Mean similarity of ``instruction`` to the calibration completions written for other
        instructions: how similar unrelated text already is ("write a note" instructions
        resemble every text less than "explain X" ones)."""
        if instruction not in self._baselines:
            unrelated = [
                ex.completion for ex in calibration_examples() if ex.instruction != instruction
            ]
            sims = self.embed(unrelated) @ self.embed([instruction])[0]
            self._baselines[instruction] = float(sims.mean())
        return self._baselines[instruction]

    def fluency_score(self, text: str) -> float:
        score = self.lexical_fluency(text)
        if self.fluency_lm is not None:
            score -= 0.25 * max(0.0, self.mean_nll(text) - _NLL_FREE)
        return score

    def lexical_fluency(self, text: str) -> float:
        """The fluency score's lexical part: ``-(4·loop + 4·non_words + 2·symbols)``."""
        stats = text_stats(text, self.lexicon)
        return -(4.0 * stats.loop + 4.0 * stats.non_words + 2.0 * stats.symbols)

    def screened_fluency_rating(self, text: str) -> int | None:
        """The fluency rating from the bfloat16 screen when its NLL, give or take its bound,
        leaves the score on one side of both cuts; None when it does not (or there is no
        screened NLL, or the float32 NLL is known: then the exact path is as cheap)."""
        if text in self._nll or text not in self._screened or "fluency" not in self.cuts:
            return None
        nll, n_tokens = self._screened[text]
        if not math.isfinite(nll):
            return None
        bound = max(_SCREEN_NLL_SCALE / math.sqrt(max(n_tokens, 1)), _SCREEN_NLL_FLOOR)
        lexical = self.lexical_fluency(text)
        cuts = self.cuts["fluency"]
        # The score falls as the NLL rises: the highest NLL gives the lowest score.
        lowest = lexical - 0.25 * max(0.0, nll + bound - _NLL_FREE)
        highest = lexical - 0.25 * max(0.0, nll - bound - _NLL_FREE)
        rating = three_level(lowest, cuts)
        return rating if rating == three_level(highest, cuts) else None

    def mean_nll(self, text: str) -> float:
        """Mean per-token negative log-likelihood of ``text`` under the fluency LM (nats)."""
        return self.mean_nlls([text])[0]

    @torch.inference_mode()
    def mean_nlls(self, texts: Sequence[str]) -> list[float]:
        """:meth:`mean_nll` of every text, the missing ones computed in right-padded batches
        of at most ``_NLL_BATCH_TOKENS`` tokens (one forward per batch, not per text)."""
        lm = self.fluency_lm
        if lm is None:
            raise ValueError("mean_nll needs a fluency LM")
        for text, (nll, _) in self._batched_nlls(lm.model, texts, self._nll).items():
            self._nll[text] = nll if math.isfinite(nll) else 20.0
        return [self._nll[t] for t in texts]

    @torch.inference_mode()
    def screen_nlls(self, texts: Sequence[str]) -> None:
        """The bfloat16 screen's NLL of every text not yet known either way (float32 or
        screened), batched as :meth:`mean_nlls`."""
        lm = self.fluency_lm
        if lm is None:
            raise ValueError("the fluency screen needs a fluency LM")
        if self._screen_model is None:
            self._screen_model = copy.deepcopy(lm.model).to(torch.bfloat16)
        known = {**self._screened, **self._nll}
        self._screened.update(self._batched_nlls(self._screen_model, texts, known))

    def _batched_nlls(
        self, model: torch.nn.Module, texts: Sequence[str], known: Container[str]
    ) -> dict[str, tuple[float, int]]:
        """(mean NLL, tokens scored) of each text of ``texts`` not in ``known`` under ``model``."""
        lm = self.fluency_lm
        assert lm is not None
        missing = sorted({t for t in texts if t not in known})
        found: dict[str, tuple[float, int]] = {}
        encoded = {}
        for text in missing:
            ids = nll_token_ids(lm, text)
            if len(ids) < 2:
                found[text] = (_NLL_FREE, 0)
            else:
                encoded[text] = ids
        # Similar lengths share a batch: little padding, the same logits as one text alone.
        order = sorted(encoded, key=lambda t: len(encoded[t]))
        batch: list[str] = []
        for text in order:
            width = len(encoded[text])
            if batch and width * (len(batch) + 1) > _NLL_BATCH_TOKENS:
                found.update(_nll_batch(model, lm.device, batch, encoded))
                batch = []
            batch.append(text)
        if batch:
            found.update(_nll_batch(model, lm.device, batch, encoded))
        return found

    def prepare(self, questions: Sequence[tuple[str, str, str]]) -> None:
        """Compute what rating ``questions`` ((kind, text, reference) each) needs in a few
        batched passes: the embeddings of every text, word, phrase and instruction, the
        instructions' baselines and the fluency LM's NLL of every text. :meth:`rate` then
        only looks them up, so rating many texts at once gives the ratings one at a time
        would, much faster."""
        strings: list[str] = []
        instructions: list[str] = []
        nll_texts: list[str] = []
        for kind, text, reference in questions:
            if self.by_rule(kind, text) is not None:
                continue
            if kind == "concept":
                kept, phrase = self.concept_evidence(reference)
                if phrase and not any(token_in_text(t, text) for t in kept):
                    strings += [phrase, *content_words(text)]
            elif kind == "instruct":
                strings += [text, reference]
                instructions.append(reference)
            elif self.fluency_lm is not None:
                nll_texts.append(text)
        if instructions:
            strings += [ex.completion for ex in calibration_examples()]
        self.embed(strings)
        for instruction in dict.fromkeys(instructions):
            self.instruction_baseline(instruction)
        if nll_texts and self.screen_fluency and "fluency" in self.cuts:
            self.screen_nlls(nll_texts)
            nll_texts = [t for t in nll_texts if self.screened_fluency_rating(t) is None]
        if nll_texts:
            self.mean_nlls(nll_texts)

    def score(self, kind: str, text: str, reference: str) -> float:
        if kind == "concept":
            return self.concept_score(text, reference)
        if kind == "instruct":
            return self.instruct_score(text, reference)
        return self.fluency_score(text)

    # ------------------------------------------------------------------ ratings
    def calibrate(self, kind: str) -> tuple[float, float, float]:
        """The (t1, t2, training accuracy) cuts of ``kind``, fit once on ``calibration.json``
        (on the examples that the score decides: not the empty or gibberish ones that
        :meth:`rate` settles by rule)."""
        if kind not in self.cuts:
            references = {"concept": "concept", "instruct": "instruction", "fluency": "concept"}
            cached = _stored_cuts(self.cuts_key, kind) if self.cuts_key else None
            if cached is not None:
                self.cuts[kind] = cached
                return cached
            examples = [
                ex for ex in calibration_examples() if self.by_rule(kind, ex.completion) is None
            ]
            self.prepare([(kind, ex.completion, getattr(ex, references[kind])) for ex in examples])
            scores = [
                self.score(kind, ex.completion, getattr(ex, references[kind])) for ex in examples
            ]
            self.cuts[kind] = fit_three_levels(scores, [ex.ratings[kind] for ex in examples])
            logger.info(
                "offline judge: %s cuts %.3f / %.3f, accuracy %.2f on %d labelled examples",
                kind,
                *self.cuts[kind],
                len(examples),
            )
            if self.cuts_key:
                _store_cuts(self.cuts_key, kind, self.cuts[kind])
        return self.cuts[kind]

    def by_rule(self, kind: str, text: str) -> int | None:
        """The rating where a rule settles it (empty text: 0; gibberish answers no
        instruction: instruct 0), else None."""
        if not text.strip():
            return 0
        if kind == "instruct" and self.is_gibberish(text):
            return 0
        return None

    def rate(self, kind: str, text: str, reference: str) -> int:
        ruled = self.by_rule(kind, text)
        if ruled is not None:
            return ruled
        if kind == "fluency":
            screened = self.screened_fluency_rating(text)
            if screened is not None:
                self.screen_counts["settled"] += 1
                return screened
            self.screen_counts["float32"] += 1
        return three_level(self.score(kind, text, reference), self.calibrate(kind))

    def rate_many(self, questions: Sequence[tuple[str, str, str]]) -> list[int]:
        """:meth:`rate` of every (kind, text, reference), computed in batches (:meth:`prepare`)."""
        for kind in dict.fromkeys(q[0] for q in questions):
            self.calibrate(kind)
        self.prepare(questions)
        return [self.rate(*q) for q in questions]

    def is_gibberish(self, text: str) -> bool:
        """Mostly non-words or symbols: the text answers nothing, whatever its embedding."""
        stats = text_stats(text, self.lexicon)
        return stats.non_words + stats.symbols >= 0.5

    def describe(self) -> dict[str, Any]:
        return {
            kind: {"cuts": [round(c, 4) for c in cuts[:2]], "train_accuracy": round(cuts[2], 3)}
            for kind, cuts in self.cuts.items()
        }
