"""Latent-first targets (METHODS §3): which latents are steered, each toward its own explanation.

As the interpretability-vs-utility paper does (it explains 1,000 latents per SAE and samples 100
of them), a *pool* of candidates is explained first and the steered latents are sampled from the
explained ones with a seeded RNG. Not the first n of one fixed order: candidates come in the same
order for every SAE of one width, so two SAEs would steer the same latent ids.

An explanation is steered toward only if it can be evidence of steering. A token-list
explanation (the offline explainer's ``"OF", " turtle" (context: ...)``) whose every token is
common in ordinary text — present in more than the judge's set share of reference windows —
would be "present" in almost any answer, steered or not; such a latent is skipped as
unexplainable and the next candidate is explained instead. Skips are counted and each kept
explanation's token rates are logged.

Candidates are explained in an order seeded by the SAE (:func:`seeded_order`), not best first
or by latent id: with one fixed order the same few latent ids were steered in most SAEs of a
width (at stop 19 latent 786 in six of ten runs, 2101 in five).

Nor is an instruction used for a concept it already holds (:func:`echoes_concept`): an
explanation token written in the instruction ("keeping the order" for a latent about
``" order"``) comes back in any on-topic answer, steered or not. At stop 19 eight of the
default study's 18 credited SAE rows were that echo.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from project.concepts import Instruction, InstructionSplit, sample_instructions
from project.judges import Judge
from project.judges.rating import token_in_text

log = logging.getLogger(__name__)

# latent ids -> {latent: explanation} ("" where the judge could not explain it).
Explainer = Callable[[list[int]], dict[int, str]]


@dataclass
class ExplainedPool:
    """The explained candidates of one SAE and what was left out on the way."""

    explanations: dict[int, str]  # latent -> explanation, informative ones only, in pool order
    token_rates: dict[int, dict[str, float]] = field(default_factory=dict)
    n_explained: int = 0  # candidates asked for an explanation
    n_unexplained: int = 0  # the judge wrote none
    n_uninformative: int = 0  # only tokens that ordinary text already holds

    def metrics(self) -> dict[str, float]:
        return {
            "explain_pool_size": float(len(self.explanations)),
            "explain_asked": float(self.n_explained),
            "explain_unexplained": float(self.n_unexplained),
            "explain_uninformative": float(self.n_uninformative),
        }


def pool_size(explain_pool: int, n_concepts: int) -> int:
    """Explained candidates wanted per SAE: ``explain_pool``, or ``2 · n_concepts`` for 0 (the
    paper explains 10×; on a CPU each explanation costs about as much as a steered target)."""
    return explain_pool if explain_pool > 0 else 2 * n_concepts


def token_evidence(judge: Judge, explanation: str) -> tuple[dict[str, float], bool]:
    """(per explanation token, the share of the judge's reference windows holding it as
    written; whether any token is rare enough to count as evidence). A judge without token
    rates (a chat model rating prose explanations) counts every explanation as informative."""
    rates_of = getattr(judge, "token_window_rates", None)
    informative_of = getattr(judge, "informative_tokens", None)
    if rates_of is None or informative_of is None:
        return {}, True
    rates = dict(rates_of(explanation))
    if not rates:  # a prose explanation: its words, not its tokens, are rated
        return rates, True
    return rates, bool(informative_of(explanation))


def explained_pool(
    candidates: Sequence[int], want: int, explain: Explainer, judge: Judge
) -> ExplainedPool:
    """Explain candidates in order until ``want`` of them have an informative explanation (or
    the candidates run out); asks in chunks so that skips are replaced by the next ones."""
    pool = ExplainedPool({})
    offset = 0
    while len(pool.explanations) < want and offset < len(candidates):
        # A few more than missing, as some will be skipped; explaining costs ~0.5 s a latent.
        missing = want - len(pool.explanations)
        ask = list(candidates[offset : offset + missing + max(2, missing // 4)])
        offset += len(ask)
        found = explain(ask)
        pool.n_explained += len(ask)
        for latent in ask:
            text = found.get(latent, "").strip()
            if not text:
                pool.n_unexplained += 1
                continue
            rates, informative = token_evidence(judge, text)
            if not informative:
                pool.n_uninformative += 1
                continue
            if len(pool.explanations) < want:
                pool.explanations[latent] = text
                pool.token_rates[latent] = rates
    if pool.n_uninformative:
        log.info(
            "latent targets: %d of %d explained candidates skipped (only common tokens)",
            pool.n_uninformative,
            pool.n_explained,
        )
    return pool


def sample_latents(pool: ExplainedPool, n: int, seed: int, sae_key: str) -> list[int]:
    """``n`` latents sampled from the pool without replacement, seeded by ``seed`` and the SAE
    (``sae_key``: project.registry.sae_identity), in pool order; all of them when the pool is
    smaller."""
    latents = list(pool.explanations)
    if len(latents) <= n:
        return latents
    digest = hashlib.sha256(f"{seed}:{sae_key}".encode()).digest()
    chosen = set(random.Random(int.from_bytes(digest[:8], "big")).sample(latents, n))
    return [i for i in latents if i in chosen]


def seeded_order(
    candidates: Sequence[int], n_latents: int, seed: int, sae_key: str, salt: str
) -> list[int]:
    """``candidates`` in one order drawn from all ``n_latents`` latents, seeded by (seed, the SAE,
    ``salt``): a subset of candidates is a uniform draw from all of them, and another SAE (or
    purpose) draws other latents."""
    digest = hashlib.sha256(f"{seed}:{sae_key}:{salt}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
    order = torch.randperm(n_latents, generator=generator)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n_latents)
    ranks = rank.tolist()
    return sorted(candidates, key=lambda latent: ranks[latent])


def evidence_tokens(judge: Judge, concept: str) -> list[str]:
    """The tokens of a token-list explanation that the judge counts as evidence (its
    informative ones); empty for a prose concept or a judge without token rates."""
    informative_of = getattr(judge, "informative_tokens", None)
    return list(informative_of(concept)) if informative_of is not None else []


def echoes_concept(tokens: Sequence[str], instruction: str) -> bool:
    """Whether the instruction already holds one of the concept's evidence tokens, matched as
    the judge matches a completion (as written, never inside a word)."""
    return any(token_in_text(token, instruction) for token in tokens)


def instructions_without_echo(
    key: str,
    concept: str,
    pool: Sequence[Instruction],
    n: int,
    genre: str | None,
    seed: int,
    judge: Judge,
) -> tuple[InstructionSplit | None, int]:
    """(the target's seeded dev/test sample from the instructions that do not already hold
    its concept's evidence, how many of the pool did); None when fewer than ``n`` are left.
    Where none echoes, the sample is exactly ``sample_instructions``' on the whole pool."""
    tokens = evidence_tokens(judge, concept)
    usable = [i for i in pool if not echoes_concept(tokens, i.text)]
    excluded = len(pool) - len(usable)
    if len(usable) < n:
        return None, excluded
    return sample_instructions(key, list(usable), n, genre, seed), excluded
