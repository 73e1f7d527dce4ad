"""The prompting reference: a chat judge writes the steering prompt, the offline judge uses
saeflow's template (issue 9, METHODS §3)."""

from __future__ import annotations

from evaluation.steering.config import SteerConfig
from evaluation.steering.protocol import PROMPT, Target, build_rows, judge_steering_prompts
from project.concepts import Instruction, InstructionSplit
from project.judges import ChatJudge, build_judge
from project.judges.prompts import parse_steering_prompt


class _WritingChat(ChatJudge):
    """A chat judge whose model answers from a script; the request and parse paths are real."""

    name = "writing"

    def __init__(self, answers: dict[str, str]) -> None:
        super().__init__()
        self.answers = answers
        self.asked: list[str] = []

    def _chat(self, messages: list[dict[str, str]], max_tokens: int) -> str | None:
        content = messages[-1]["content"]
        self.asked.append(content)
        for needle, answer in self.answers.items():
            if needle in content:
                return answer
        return ""


def _target(concept: str) -> Target:
    split = InstructionSplit((Instruction("Name a fruit."), Instruction("Count to three.")))
    return Target(concept, concept, None, latent=0, max_activation=1.0, split=split)


def test_parse_steering_prompt() -> None:
    assert parse_steering_prompt('"Always mention the sea."') == "Always mention the sea."
    assert parse_steering_prompt("Prompt: Talk about music in every answer.") == (
        "Talk about music in every answer."
    )
    assert parse_steering_prompt("") is None
    assert parse_steering_prompt("OK.") is None  # too short to state a concept


def test_chat_judge_writes_the_prompt_and_rows_use_axbench_frame() -> None:
    judge = _WritingChat({"sea travel": "Prompt: Bring ships and the open sea into every answer."})
    targets = [_target("sea travel"), _target("tax law")]
    written = judge_steering_prompts(targets, judge)
    # One request per concept; an empty answer is a counted failure and falls back to the template.
    assert written == {"sea travel": "Bring ships and the open sea into every answer."}
    assert len(judge.asked) == 2 and all("[Concept Start]" in a for a in judge.asked)
    assert judge.parse_failures == 1

    config = SteerConfig(factors=(1.0,), n_instructions=2)
    rows = [r for r in build_rows(targets, config, "concept", written) if r.method == PROMPT]
    sea = {r.prompt for r in rows if targets[r.target].concept == "sea travel"}
    assert sea == {
        "Bring ships and the open sea into every answer.\n\nQuestion: Name a fruit.",
        "Bring ships and the open sea into every answer.\n\nQuestion: Count to three.",
    }
    tax = {r.prompt for r in rows if targets[r.target].concept == "tax law"}
    assert tax == {
        config.prompt_template.format(concept="tax law", instruction=i)
        for i in ("Name a fruit.", "Count to three.")
    }


def test_offline_judge_writes_no_prompt() -> None:
    # No LLM to write with: the template states the concept.
    assert build_judge("offline").steering_prompt("sea travel") is None
