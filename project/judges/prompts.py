"""Prompts and answer parsing shared by the chat judges (SAEBench's autointerp prompts,
AxBench's rating prompts, METHODS.md §2 and §3).

The LLM judges ask for ``Rating: [[n]]`` and, for detection, a comma-separated list of window
numbers (or "None"), as SAEBench does. Examples given to ``explain`` are text windows in which
the tokens where the latent fires are marked ``<<like this>>``; newlines are shown as ``↵``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

RATING_KINDS = ("concept", "instruct", "fluency")
_MARK_RE = re.compile(r"<<(.*?)>>", re.DOTALL)

# ---------------------------------------------------------------------------------------------
# parsing (pure functions, shared by the LLM judges)


def parse_rating(answer: str) -> float | None:
    """AxBench's parse (METHODS §3): the text after the last ``Rating:``, its first line, with
    brackets, quotes, ``*`` and spaces stripped, read as a float. None (which counts as 0 and is
    counted as a parse failure) when it is missing, unparsable or outside [0, 2]."""
    text = answer or ""
    at = text.lower().rfind("rating:")
    if at < 0:
        return None
    lines = text[at + len("rating:") :].strip().splitlines()
    first = lines[0].strip().strip("[]\"'* ") if lines else ""
    try:
        value = float(first)
    except ValueError:
        return None
    if not 0.0 <= value <= 2.0 or value != value:
        return None
    return value


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


_STEERING_PROMPT_REQUEST = (
    "Write an instruction for a language model that makes it bring up the concept below in "
    "whatever it answers next, even where the question has nothing to do with it. Write it "
    "to the model directly, in one to three sentences; you may add a short example. Reply "
    "with the instruction alone, no preamble and no quotes.\n\n[Concept Start]\n{concept}\n"
    "[Concept End]"
)


def steering_prompt_messages(concept: str) -> list[dict[str, str]]:
    """Chat messages asking the judge's LLM to write a steering prompt for ``concept`` (the
    prompting reference of AxBench, METHODS §3; the wording is saeflow's)."""
    return [{"role": "user", "content": _STEERING_PROMPT_REQUEST.format(concept=concept)}]


def parse_steering_prompt(answer: str) -> str | None:
    """The written prompt, stripped of quotes and a leading label; None when nothing usable
    (empty, or too short to state a concept) came back."""
    text = answer.strip().strip("\"'“”").strip()
    text = re.sub(r"^(prompt|instruction)\s*:\s*", "", text, flags=re.IGNORECASE).strip()
    return text if len(text.split()) >= 3 else None


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
    check_kind(kind)
    return [{"role": "user", "content": _RATE_PROMPTS[kind].format(reference=reference, text=text)}]


def check_kind(kind: str) -> None:
    if kind not in RATING_KINDS:
        raise ValueError(f"unknown rating kind {kind!r}; valid: {', '.join(RATING_KINDS)}")


_CONCEPT_RESPONSE_REQUEST = (
    "Answer the request below as a helpful assistant would, and weave the concept below into "
    "your answer wherever you can, even where the request has nothing to do with it. Keep it "
    "under 100 words. Reply with the answer alone.\n\n[Request Start]\n{instruction}\n"
    "[Request End]\n\n[Concept Start]\n{concept}\n[Concept End]"
)


def concept_response_messages(concept: str, instruction: str) -> list[dict[str, str]]:
    """Chat messages asking the judge's LLM for an answer to ``instruction`` that brings in
    ``concept``: the training data of the trained steering methods (METHODS §3; AxBench has
    gpt-4o-mini write them; the wording is saeflow's)."""
    content = _CONCEPT_RESPONSE_REQUEST.format(concept=concept, instruction=instruction)
    return [{"role": "user", "content": content}]
