"""The judge interface: :class:`Judge` (explain / detect / rate / identity) and
:class:`ChatJudge`, the base of the judges that ask a chat model."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from project.judges.prompts import (
    concept_response_messages,
    detection_messages,
    explanation_messages,
    parse_detection,
    parse_explanation,
    parse_rating,
    parse_steering_prompt,
    rating_messages,
    steering_prompt_messages,
)

logger = logging.getLogger(__name__)

# Keep only the last failures' raw answers for the eval's "unstructured" record.
_MAX_FAILURE_LOG = 20

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
    def rate(self, kind: str, text: str, reference: str) -> float | None:
        """0/1/2 on ``kind`` ∈ concept / instruct / fluency (``reference`` is the concept or the
        instruction; unused for fluency); None when the answer could not be parsed."""

    def rate_many(self, questions: Sequence[tuple[str, str, str]]) -> list[float | None]:
        """:meth:`rate` of every (kind, text, reference), in order; ``max_concurrency`` calls
        at a time. Judges that can batch the work (the offline judge) override it."""
        workers = max(1, int(self.max_concurrency))
        if workers == 1:
            return [self.rate(*q) for q in questions]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda q: self.rate(*q), questions))

    def steering_prompt(self, concept: str) -> str | None:
        """A prompt written to steer a model toward ``concept`` (AxBench's prompting reference),
        or None where this judge writes none (the offline judge): the caller then states the
        concept with its own template."""
        return None

    def concept_response(self, concept: str, instruction: str) -> str | None:
        """An answer to ``instruction`` that brings in ``concept`` (training data of the trained
        steering methods), or None where this judge writes none (the offline judge): the
        caller then has the steered LM write it under the prompting prompt."""
        return None

    def observe_corpus(self, windows: list[str]) -> None:  # noqa: B027 - optional hook
        """Optional: unmarked random windows of the evaluation corpus. Judges that calibrate on
        random text (the offline judge) use them; LLM judges ignore them."""

    def describe(self) -> dict[str, Any]:
        """What to log about this judge (name, model, settings)."""
        return {"name": self.name}

    def identity(self) -> dict[str, str]:
        """What makes two results of this judge comparable (METHODS §5): ``kind``, ``model``,
        ``endpoint``, ``temperature`` and ``calibration`` (a hash of the calibration data and
        rule, empty for judges without one). Eval reuse hashes and steering runs log it."""
        return {
            "kind": self.name,
            "model": "",
            "endpoint": "",
            "temperature": "",
            "calibration": "",
        }


class ChatJudge(Judge):
    """A judge that asks a chat model with the prompts above; subclasses implement ``_chat``."""

    max_tokens_explain = 64
    max_tokens_detect = 32
    max_tokens_rate = 128
    max_tokens_steering_prompt = 160
    max_tokens_concept_response = 192

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

    def rate(self, kind: str, text: str, reference: str) -> float | None:
        messages = rating_messages(kind, text, reference)
        answer = self._ask(f"rate:{kind}", messages, self.max_tokens_rate)
        if answer is None:
            return None
        rating = parse_rating(answer)
        if rating is None:
            self._count_failure(f"rate:{kind}", answer)
        return rating

    def concept_response(self, concept: str, instruction: str) -> str | None:
        messages = concept_response_messages(concept, instruction)
        answer = self._ask("concept_response", messages, self.max_tokens_concept_response)
        if answer is None or not answer.strip():
            return None
        return answer.strip()

    def steering_prompt(self, concept: str) -> str | None:
        messages = steering_prompt_messages(concept)
        answer = self._ask("steering_prompt", messages, self.max_tokens_steering_prompt)
        if answer is None:
            return None
        prompt = parse_steering_prompt(answer)
        if prompt is None:
            self._count_failure("steering_prompt", answer)
        return prompt
