"""The AxBench steering protocol (METHODS.md §3) on one SAE: targets, generations, ratings,
scores.

A *target* is one concept to steer toward, with the SAE latent that steers it and, in concept
mode, the reference directions. For every target and each of its instructions (a dev and a test
half), saeflow generates:

- ``sae``: addition ``α·m_i·v_i`` (or clamping latent i to ``α·m_i``) for each factor α;
- ``diffmean`` (concept mode): the unit DiffMean direction times ``α·s``;
- ``random`` (concept mode): a seeded random unit direction times ``α·s`` (the floor);
- ``prompt`` (concept mode): no intervention, the concept stated in the prompt: written by the
  judge's LLM where the judge is a chat model (AxBench's frame), else saeflow's template;
- ``unsteered``: the instruction alone, the model untouched.

``s``, the scale of the reference directions, is the median ``m_i`` over the SAE's live latents,
so that a reference vector at factor α has the norm of a typical latent's ``α·m_i·v_i``.

All generations run batched through :func:`project.generation.generate`; sampling seeds are a
hash of (seed, prompt), so every method on one instruction shares its sampling noise and α = 0
reproduces the unsteered generation exactly. The judge rates each continuation three times
(concept, instruction, fluency; 0–2; an unparsable answer counts 0 and is counted); the score is
their harmonic mean, 0 when any is 0. Per target, α* is the argmax of the dev mean (ties: the
smaller factor) and the target's score is the test mean at α*; a method's score is the mean over
targets, with a bootstrap interval.

Several SAEs' runs on one LM and layer go through the protocol together
(:func:`run_protocols`, one :class:`ProtocolJob` each): each stage runs for all of them at
once, so their generations share batches and their ratings one judge call.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

from evaluation.selection.supervised import ConceptLatents, select_and_label
from evaluation.steering.config import SteerConfig
from evaluation.steering.interventions import ClampLatent, unit_decoder_rows
from evaluation.steering.trained.apply import generate_with_adapters
from evaluation.steering.trained.config import TrainedAdapter
from project.concepts import Concept, Instruction, InstructionSplit
from project.generation import GenerationConfig, generate, generate_added, prompt_seed
from project.judges import Judge
from project.lm import LoadedLM, residual_activations
from project.saes import SparseAutoencoder
from project.statistics import bootstrap_interval

logger = logging.getLogger(__name__)

SAE = "sae"
DIFFMEAN = "diffmean"
RANDOM = "random"
PROMPT = "prompt"
UNSTEERED = "unsteered"
LORA = "lora"  # the trained reference the comparison measures every method against
FACTOR_METHODS = (SAE, DIFFMEAN, RANDOM)
RATING_KINDS = ("concept", "instruct", "fluency")
SUPERVISED_PREFIX = "sae_sup_k"


def supervised_method(k: int) -> str:
    """The method that steers a concept's top-``k`` supervised latents together."""
    return f"{SUPERVISED_PREFIX}{k}"


def is_factor_method(method: str) -> bool:
    """Whether ``method``'s factor scales its push (not so for unsteered and prompting)."""
    return method in FACTOR_METHODS or method.startswith(SUPERVISED_PREFIX)


def harmonic_mean(concept: float, instruct: float, fluency: float) -> float:
    """AxBench's score ``3 / (1/C + 1/I + 1/F)``; 0 when any rating is ≤ 0 (range [0, 2])."""
    parts = (concept, instruct, fluency)
    if any(not p > 0 for p in parts):
        return 0.0
    return 3.0 / sum(1.0 / p for p in parts)


def rating_value(rating: float | None) -> float | None:
    """A judge's rating as a number in [0, 2], or None when it is missing or outside the scale
    (the caller counts those and scores them 0, as AxBench does)."""
    if rating is None or isinstance(rating, bool):
        return None
    try:
        value = float(rating)
    except (TypeError, ValueError):
        return None
    return value if 0.0 <= value <= 2.0 else None


@dataclass
class Target:
    """One concept to steer toward and how each method steers it."""

    key: str  # the concept, or "latent <i>" in latent mode
    concept: str  # what the judge reads
    genre: str | None
    latent: int
    max_activation: float  # m_i
    auroc: float = math.nan  # concept mode: the latent's max-pooled AUROC on the examples
    diffmean_D: Tensor | None = None
    random_D: Tensor | None = None
    # The random direction's norm per unit factor: the run's reference scale s (concept mode,
    # DiffMean's norm) unless set; latent mode sets m_i, the steered latent's own norm.
    random_scale: float | None = None
    split: InstructionSplit = field(default_factory=lambda: InstructionSplit(()))
    # Concept mode with supervised_k: K -> the concept's selected latents (select-and-label).
    supervised: dict[int, ConceptLatents] = field(default_factory=dict)
    # m_i of every latent a method of this target steers (the AUROC latent and the supervised).
    latent_scales: dict[int, float] = field(default_factory=dict)
    # Concept mode with trained methods: method -> the adapter trained for this concept.
    adapters: dict[str, TrainedAdapter] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """One generation: a method on a target's instruction at a factor."""

    method: str
    target: int
    instruction: Instruction
    split: str
    factor: float
    prompt: str


@dataclass
class SteeringResult:
    """Metrics (flat, MLflow names) and tables (column name -> values) of one run."""

    metrics: dict[str, float]
    tables: dict[str, dict[str, list[Any]]]


# ---------------------------------------------------------------------------------------------
# concept mode: the SAE's latent and the reference directions


@torch.no_grad()
def example_activations(
    lm: LoadedLM, layer: int, texts: Sequence[str], max_tokens: int, batch_size: int = 16
) -> tuple[Tensor, Tensor]:
    """(acts_ND, text_N): hook activations of every real token of ``texts`` (cut to
    ``max_tokens``, BOS/EOS/pad left out) and the index of the text each row comes from."""
    tokenizer = lm.tokenizer
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [
        tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
        for t in texts
    ]
    bos = tokenizer.bos_token_id
    encoded = [([bos] if bos is not None else []) + ids for ids in encoded]
    acts, owners = [], []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        ids_BT = torch.full((len(batch), width), pad, dtype=torch.long)
        mask_BT = torch.zeros((len(batch), width), dtype=torch.long)
        for b, ids in enumerate(batch):
            ids_BT[b, : len(ids)] = torch.tensor(ids)
            mask_BT[b, : len(ids)] = 1
        keep_BT = mask_BT.bool()
        for t in special:
            keep_BT &= ids_BT != t
        hidden_BTD = residual_activations(lm, ids_BT, layer, mask_BT).float().cpu()
        acts.append(hidden_BTD[keep_BT])
        owners.append((torch.arange(len(batch))[:, None] + start).expand_as(keep_BT)[keep_BT])
    return torch.cat(acts), torch.cat(owners)


@torch.no_grad()
def max_pooled_latents(
    sae: SparseAutoencoder, acts_ND: Tensor, text_N: Tensor, n_texts: int
) -> Tensor:
    """[n_texts, F]: each latent's largest activation over each text's tokens."""
    pooled = torch.zeros(n_texts, sae.cfg.d_sae)
    for chunk, owners in zip(acts_ND.split(4096), text_N.split(4096), strict=True):
        f_NF = sae.encode(chunk.to(sae.W_dec.dtype)).float()
        pooled.scatter_reduce_(0, owners[:, None].expand_as(f_NF), f_NF, reduce="amax")
    return pooled


def auroc_per_column(scores_NF: Tensor, labels_N: Tensor) -> Tensor:
    """ROC AUC of every column as a score for ``labels_N`` (Mann–Whitney, ties averaged)."""
    positive = labels_N.bool().numpy()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs positive and negative examples")
    ranks = rankdata(scores_NF.numpy(), axis=0)
    u = ranks[positive].sum(axis=0) - n_pos * (n_pos + 1) / 2
    return torch.tensor(u / (n_pos * n_neg), dtype=torch.float32)


def concept_targets(
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    concepts: list[Concept],
    candidates: list[int],
    max_activation_F: Tensor,
    config: SteerConfig,
) -> list[Target]:
    """Per concept: the candidate latent with the best max-pooled AUROC on its examples, the
    unit DiffMean direction (mean token activation on positives minus on negatives), a
    seeded random unit direction and, for each K of ``supervised_k``, the top-K latents by
    supervised select-and-label on the same examples."""
    texts: list[str] = []
    spans = []
    for c in concepts:
        start = len(texts)
        texts.extend(c.positives)
        texts.extend(c.negatives)
        spans.append((start, len(c.positives), len(c.negatives)))
    acts_ND, text_N = example_activations(lm, layer, texts, config.example_tokens)
    pooled_XF = max_pooled_latents(sae, acts_ND, text_N, len(texts))
    candidate_ids = torch.tensor(candidates)
    targets = []
    for c, (start, n_pos, n_neg) in zip(concepts, spans, strict=True):
        rows = torch.arange(start, start + n_pos + n_neg)
        labels = torch.cat([torch.ones(n_pos), torch.zeros(n_neg)])
        auroc_C = auroc_per_column(pooled_XF[rows][:, candidate_ids], labels)
        best = int(torch.argmax(auroc_C))
        latent = int(candidate_ids[best])
        pos_mask = (text_N >= start) & (text_N < start + n_pos)
        neg_mask = (text_N >= start + n_pos) & (text_N < start + n_pos + n_neg)
        diff_D = acts_ND[pos_mask].mean(0) - acts_ND[neg_mask].mean(0)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + len(targets))
        random_D = torch.randn(lm.d_model, generator=generator)
        target = Target(
            key=c.concept,
            concept=c.concept,
            genre=c.genre,
            latent=latent,
            max_activation=float(max_activation_F[latent]),
            auroc=float(auroc_C[best]),
            diffmean_D=diff_D / diff_D.norm().clamp_min(1e-12),
            random_D=random_D / random_D.norm(),
        )
        for k in config.supervised_k:
            target.supervised[k] = select_and_label(
                sae,
                acts_ND,
                text_N,
                c.concept,
                range(start, start + n_pos),
                range(start + n_pos, start + n_pos + n_neg),
                k,
                candidates,
                min_support=config.supervised_min_support,
            )
        target.latent_scales = {
            i: float(max_activation_F[i])
            for i in (latent, *(i for sel in target.supervised.values() for i in sel.latents))
        }
        targets.append(target)
    return targets


# ---------------------------------------------------------------------------------------------
# generations


def prompting_prompt(
    concept: str, instruction: str, steering_prompts: dict[str, str], template: str
) -> str:
    """The prompting reference's prompt: the judge's LLM's written prompt for ``concept`` in
    AxBench's frame ``{prompt}\n\nQuestion: {instruction}``, else saeflow's ``template``."""
    written = steering_prompts.get(concept)
    if written:
        return f"{written}\n\nQuestion: {instruction}"
    return template.format(concept=concept, instruction=instruction)


def build_rows(
    targets: list[Target],
    config: SteerConfig,
    mode: str,
    steering_prompts: dict[str, str] | None = None,
) -> list[Row]:
    """Every generation of the run, in a fixed order. ``steering_prompts`` (concept -> a prompt
    the judge's LLM wrote) replace saeflow's template for the prompting reference, in AxBench's
    frame ``{prompt}\n\nQuestion: {instruction}``."""
    steering_prompts = steering_prompts or {}
    methods = (
        (*FACTOR_METHODS, *(supervised_method(k) for k in config.supervised_k))
        if mode == "concept"
        else (SAE,)
    )
    rows = []
    for t_index, target in enumerate(targets):
        for split_name, instructions in (("dev", target.split.dev), ("test", target.split.test)):
            for instruction in instructions:
                rows.append(Row(UNSTEERED, t_index, instruction, split_name, 0.0, instruction.text))
                if mode == "concept":
                    prompt = prompting_prompt(
                        target.concept, instruction.text, steering_prompts, config.prompt_template
                    )
                    rows.append(Row(PROMPT, t_index, instruction, split_name, 0.0, prompt))
                for method in (*methods, *(config.trained if mode == "concept" else ())):
                    for factor in config.factors:
                        rows.append(
                            Row(method, t_index, instruction, split_name, factor, instruction.text)
                        )
    return rows


def trained_seed(seed: int, row: Row) -> int:
    """A factor-less (trained) method's sampling seed for ``row``: its factor row is another
    sample of the same prompt (AxBench), so the seed depends on the factor and the method."""
    return prompt_seed(seed, f"{row.prompt}\x00{row.method}\x00{float(row.factor)!r}")


def _vector(row: Row, target: Target, sae_rows: dict[int, Tensor], scale: float) -> Tensor | None:
    if row.method in (UNSTEERED, PROMPT) or row.factor == 0:
        return None
    if row.method == SAE:
        return row.factor * target.max_activation * sae_rows[target.latent]
    chosen = _supervised_choice(target, row.method)
    if chosen is not None:
        # K latents at once: the sum of each one's α·m_i·v_i.
        return row.factor * sum(target.latent_scales[i] * sae_rows[i] for i in chosen.latents)
    direction = target.diffmean_D if row.method == DIFFMEAN else target.random_D
    assert direction is not None
    if row.method == RANDOM and target.random_scale is not None:
        scale = target.random_scale
    return row.factor * scale * direction


@dataclass
class GenerationPlan:
    """A run's unique generations: ``add`` (prompt, added vector; a zero vector for an unsteered
    or prompting row) and ``clamp`` (prompt, (latent, value)) requests, and where each row's
    continuation is found (``where[i]`` = (kind, index))."""

    add_prompts: list[str] = field(default_factory=list)
    add_vectors: list[Tensor] = field(default_factory=list)
    clamp_prompts: list[str] = field(default_factory=list)
    clamp_specs: list[tuple[int, float]] = field(default_factory=list)
    trained_prompts: list[str] = field(default_factory=list)
    trained_adapters: list[TrainedAdapter] = field(default_factory=list)
    trained_seeds: list[int] = field(default_factory=list)
    where: list[tuple[str, int]] = field(default_factory=list)


def _generation_config(config: SteerConfig) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=config.seed,
        batch_size=config.batch_size,
        compile=config.compile,
    )


def plan_generations(
    rows: list[Row],
    targets: list[Target],
    sae: SparseAutoencoder,
    d_model: int,
    config: SteerConfig,
    reference_scale: float,
) -> GenerationPlan:
    """The unique generations behind ``rows``: rows without a steering vector (unsteered,
    prompting, α = 0) once per distinct prompt, every steered row its own."""
    latents = sorted({i for t in targets for i in (t.latent, *t.latent_scales)})
    sae_rows = dict(zip(latents, unit_decoder_rows(sae, latents), strict=True))
    clamp = config.intervention == "clamp"
    plan = GenerationPlan()
    plain: dict[str, int] = {}
    for row in rows:
        target = targets[row.target]
        if row.method in target.adapters:
            plan.where.append(("trained", len(plan.trained_prompts)))
            plan.trained_prompts.append(row.prompt)
            plan.trained_adapters.append(target.adapters[row.method])
            plan.trained_seeds.append(trained_seed(config.seed, row))
            continue
        if clamp and row.method == SAE and row.factor != 0:
            plan.where.append(("clamp", len(plan.clamp_prompts)))
            plan.clamp_prompts.append(row.prompt)
            plan.clamp_specs.append((target.latent, row.factor * target.max_activation))
            continue
        vector = _vector(row, target, sae_rows, reference_scale)
        if vector is None:
            if row.prompt not in plain:
                plain[row.prompt] = len(plan.add_prompts)
                plan.add_prompts.append(row.prompt)
                plan.add_vectors.append(torch.zeros(d_model))
            plan.where.append(("add", plain[row.prompt]))
        else:
            plan.where.append(("add", len(plan.add_prompts)))
            plan.add_prompts.append(row.prompt)
            plan.add_vectors.append(vector.float())
    return plan


def _plan_texts(
    plan: GenerationPlan,
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    config: SteerConfig,
) -> list[str]:
    generation = _generation_config(config)
    texts: dict[str, list[str]] = {"add": [], "clamp": [], "trained": []}
    if plan.add_prompts:
        texts["add"] = generate_added(
            lm,
            plan.add_prompts,
            torch.stack(plan.add_vectors),
            generation,
            layer=layer,
            progress="steer: generate",
        )
    if plan.clamp_prompts:
        texts["clamp"] = generate(
            lm,
            plan.clamp_prompts,
            generation,
            layer=layer,
            intervention=ClampLatent(
                sae,
                torch.tensor([s[0] for s in plan.clamp_specs]),
                torch.tensor([s[1] for s in plan.clamp_specs]),
            ),
            progress="steer: generate (clamp)",
        )
    if plan.trained_prompts:
        texts["trained"] = generate_with_adapters(
            lm,
            plan.trained_prompts,
            plan.trained_adapters,
            generation,
            seeds=plan.trained_seeds,
            progress="steer: generate (trained)",
        )
    return [texts[kind][i] for kind, i in plan.where]


# ---------------------------------------------------------------------------------------------
# ratings and scores


Question = tuple[str, str, str]  # (rating kind, continuation, reference)


def rating_questions(rows: list[Row], texts: list[str], targets: list[Target]) -> list[Question]:
    """The judge's questions behind ``rows``, each once."""
    questions: dict[Question, None] = {}
    for row, text in zip(rows, texts, strict=True):
        concept = targets[row.target].concept
        for kind, reference in zip(RATING_KINDS, (concept, row.instruction.text, ""), strict=True):
            questions[(kind, text, reference)] = None
    return list(questions)


def ask_judge(questions: list[Question], judge: Judge) -> dict[Question, float | None]:
    """Every question's rating in [0, 2], None where unparsable or off the scale; identical
    questions are asked once, all in one :meth:`Judge.rate_many` call (batched)."""
    keys = list(dict.fromkeys(questions))
    answers = judge.rate_many(keys)
    return {k: rating_value(a) for k, a in zip(keys, answers, strict=True)}


def rate_rows(
    rows: list[Row],
    texts: list[str],
    targets: list[Target],
    judge: Judge,
    answers: dict[Question, float | None] | None = None,
) -> tuple[list[dict[str, float]], int]:
    """Per row: the three ratings (unparsable → 0) and the harmonic-mean ``score``; and the
    number of unparsable ratings. Identical (kind, text, reference) questions are asked once;
    ``answers`` (from :func:`ask_judge`, shared by several runs) are not asked again."""
    keys = rating_questions(rows, texts, targets)
    values = answers if answers is not None else ask_judge(keys, judge)
    unparsable = sum(values[k] is None for k in keys)
    if unparsable:
        logger.warning("%d of %d ratings were unparsable and count as 0", unparsable, len(keys))
    out = []
    for row, text in zip(rows, texts, strict=True):
        concept = targets[row.target].concept
        r = {
            kind: values[(kind, text, reference)] or 0.0
            for kind, reference in zip(
                RATING_KINDS, (concept, row.instruction.text, ""), strict=True
            )
        }
        r["score"] = harmonic_mean(r["concept"], r["instruct"], r["fluency"])
        out.append(r)
    return out, unparsable


def add_concept_lift(rows: list[Row], ratings: list[dict[str, float]]) -> None:
    """Add to each rating ``unsteered_concept`` (the same target's concept rating of the
    unsteered answer to the same instruction), ``concept_lift`` = ``max(0, concept −
    unsteered_concept)`` and ``score_lift``, the harmonic mean with the lift in place of the
    concept rating (METHODS §3, concept lift). AxBench's concept rating asks whether the concept
    is present, not whether steering put it there: a latent explained by ordinary words scores
    on the unsteered answer too, and only the lift is evidence of steering."""
    unsteered: dict[tuple[int, str, str], float] = {}
    for row, r in zip(rows, ratings, strict=True):
        if row.method == UNSTEERED:
            unsteered[(row.target, row.split, row.instruction.text)] = r["concept"]
    for row, r in zip(rows, ratings, strict=True):
        base = unsteered.get((row.target, row.split, row.instruction.text), math.nan)
        r["unsteered_concept"] = base
        # Without an unsteered answer to compare with, nothing is known about the lift.
        lift = math.nan if math.isnan(base) else max(0.0, r["concept"] - base)
        r["concept_lift"] = lift
        r["score_lift"] = (
            math.nan if math.isnan(lift) else harmonic_mean(lift, r["instruct"], r["fluency"])
        )


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


# A generation cell: (method, target, factor, split) -> its rated rows.
Cells = dict[tuple[str, int, float, str], list[dict[str, float]]]
# What α* maximises on the dev half: the paper's score, and the score by concept lift.
_ALPHA_KEYS = ("score", "score_lift")


def _cells(rows: list[Row], ratings: list[dict[str, float]]) -> Cells:
    cells: Cells = defaultdict(list)
    for row, r in zip(rows, ratings, strict=True):
        cells[(row.method, row.target, row.factor, row.split)].append(r)
    return cells


def _factors(cells: Cells, method: str, target: int) -> list[float]:
    return sorted({f for (m, t, f, _s) in cells if m == method and t == target})


def _dev_means(
    cells: Cells, method: str, target: int, factors: list[float], key: str
) -> dict[float, float]:
    """Per factor, the mean of ``key`` over the target's dev rows (NaN where it has none)."""
    return {f: _mean([r[key] for r in cells.get((method, target, f, "dev"), [])]) for f in factors}


def best_factor(dev_means: dict[float, float]) -> float:
    """α*: the factor with the largest dev mean; ties go to the smaller factor."""
    return min(dev_means, key=lambda f: (-dev_means[f], f))


def summarize(
    rows: list[Row],
    ratings: list[dict[str, float]],
    targets: list[Target],
    seed: int,
) -> SteeringResult:
    """Metrics and tables of a run from its rated rows.

    Per method, two scores side by side: the paper's (``steering_score``, α* by the dev mean of
    the harmonic mean) and the score by concept lift (``steering_score_lift``, the same with the
    lift over the unsteered answer in place of the concept rating, its own α*). And per run the
    share of targets whose concept the unsteered answers already carry (``free_concept_share``):
    where it is high, the paper's score credits text that no steering wrote."""
    add_concept_lift(rows, ratings)
    cells = _cells(rows, ratings)
    methods = list(dict.fromkeys(row.method for row in rows))
    metrics: dict[str, float] = {}
    per_concept: dict[str, list[Any]] = defaultdict(list)
    chosen_by_method: dict[str, list[dict[str, float]]] = {}
    # Per target, the SAE's (α*, α* by lift): a method generated on the test half only (the
    # latent-mode floor, :func:`latent_floor_rows`) is read at them.
    sae_alphas: dict[int, tuple[float, float]] = {}
    # Each target's mean concept rating on its unsteered answers (both halves).
    unsteered_concepts: dict[int, list[float]] = defaultdict(list)
    for row, r in zip(rows, ratings, strict=True):
        if row.method == UNSTEERED:
            unsteered_concepts[row.target].append(r["concept"])
    unsteered_by_target = [_mean(unsteered_concepts[i]) for i in range(len(targets))]
    for method in methods:
        per_target: list[dict[str, float]] = []
        chosen_by_method[method] = per_target
        for t_index, target in enumerate(targets):
            factors = _factors(cells, method, t_index)
            dev, dev_lift = (_dev_means(cells, method, t_index, factors, k) for k in _ALPHA_KEYS)
            if any(cells.get((method, t_index, f, "dev")) for f in factors):
                alpha, alpha_lift = best_factor(dev), best_factor(dev_lift)
            else:
                alpha, alpha_lift = sae_alphas[t_index]
            if method == SAE:
                sae_alphas[t_index] = (alpha, alpha_lift)
            test = cells[(method, t_index, alpha, "test")]
            chosen = {k: _mean([r[k] for r in test]) for k in (*RATING_KINDS, "score")}
            test_lift = cells[(method, t_index, alpha_lift, "test")]
            chosen["score_lift"] = _mean([r["score_lift"] for r in test_lift])
            chosen["concept_lift"] = _mean([r["concept_lift"] for r in test_lift])
            per_target.append(chosen)
            per_concept["concept"].append(target.concept)
            per_concept["method"].append(method)
            per_concept["latent"].append(_method_latent(target, method))
            per_concept["max_activation"].append(
                target.max_activation if method == SAE else math.nan
            )
            per_concept["auroc"].append(target.auroc if method == SAE else math.nan)
            per_concept["alpha_star"].append(alpha)
            per_concept["dev_score"].append(dev.get(alpha, math.nan))
            per_concept["test_score"].append(chosen["score"])
            for kind in RATING_KINDS:
                per_concept[f"test_{kind}"].append(chosen[kind])
            per_concept["unsteered_concept"].append(unsteered_by_target[t_index])
            per_concept["alpha_star_lift"].append(alpha_lift)
            per_concept["dev_score_lift"].append(dev_lift.get(alpha_lift, math.nan))
            per_concept["test_score_lift"].append(chosen["score_lift"])
            per_concept["test_concept_lift"].append(chosen["concept_lift"])
        prefix = "" if method == SAE else f"{method}_"
        for name, key in (("steering_score", "score"), ("steering_score_lift", "score_lift")):
            scores = [p[key] for p in per_target]
            metrics[f"{prefix}{name}"] = _mean(scores)
            low, high = bootstrap_interval(scores, seed)
            metrics[f"{prefix}{name}_ci_low"] = low
            metrics[f"{prefix}{name}_ci_high"] = high
        for kind in (*RATING_KINDS, "concept_lift"):
            metrics[f"{prefix}{kind}_score"] = _mean([p[kind] for p in per_target])
    defined = [c for c in unsteered_by_target if not math.isnan(c)]
    if defined:
        metrics["free_concept_share"] = float(np.mean([c > 0 for c in defined]))
    metrics.update(paired_differences(chosen_by_method, seed))
    # The comparison's references: LoRA (issue: does supervised SAE selection steer as well?)
    # and the unsteered model (does a method move the concept at all?).
    metrics.update(paired_differences(chosen_by_method, seed, reference=LORA))
    if any(row.method in targets[row.target].adapters for row in rows):
        metrics.update(paired_differences(chosen_by_method, seed, reference=UNSTEERED))
    tables = {
        "per_concept": dict(per_concept),
        "per_factor": per_factor_table(rows, ratings, methods, seed),
    }
    if any(t.supervised for t in targets):
        tables["supervised_latents"] = supervised_table(targets)
        metrics["supervised_support_fallbacks"] = float(
            sum(c.support_fallback for t in targets for c in t.supervised.values())
        )
    return SteeringResult(metrics, tables)


def _supervised_choice(target: Target, method: str) -> ConceptLatents | None:
    """The select-and-label latents a ``sae_sup_k<K>`` method steers; None for other methods."""
    if not method.startswith(SUPERVISED_PREFIX):
        return None
    return target.supervised[int(method.removeprefix(SUPERVISED_PREFIX))]


def _method_latent(target: Target, method: str) -> int:
    """The latent a method steers (a supervised method's best one), -1 for a direction."""
    if method == SAE:
        return target.latent
    chosen = _supervised_choice(target, method)
    return -1 if chosen is None else chosen.latents[0]


def supervised_table(targets: list[Target]) -> dict[str, list[Any]]:
    """Select-and-label, per concept and K: each selected latent (best first) labelled with the
    concept it was selected for, its calibrated F1 and positive support, the tuned π0, its m_i,
    and whether the support filter had to be dropped for that concept."""
    table: dict[str, list[Any]] = defaultdict(list)
    for target in targets:
        for k, chosen in target.supervised.items():
            for rank, (latent, f1, support) in enumerate(
                zip(chosen.latents, chosen.f1, chosen.support, strict=True), start=1
            ):
                table["concept"].append(target.concept)
                table["method"].append(supervised_method(k))
                table["rank"].append(rank)
                table["latent"].append(latent)
                table["label"].append(chosen.concept)
                table["f1_c"].append(f1)
                table["support"].append(support)
                table["pi0"].append(chosen.pi0)
                table["max_activation"].append(target.latent_scales[latent])
                table["support_fallback"].append(chosen.support_fallback)
    return dict(table)


def _mean_and_interval(values: list[float], seed: int) -> tuple[float, float, float]:
    """(mean, bootstrap interval low, high) of ``values``."""
    low, high = bootstrap_interval(values, seed)
    return _mean(values), low, high


def paired_differences(
    chosen_by_method: dict[str, list[dict[str, float]]], seed: int, reference: str = RANDOM
) -> dict[str, float]:
    """Each method against the random-direction floor, paired by target: the mean over targets
    of (method − random) in steering score and in concept rating at each one's own α*, with a
    bootstrap interval; and in the steering score by concept lift, each at its own lift α*.
    Paired, because targets differ far more from each other than methods do on one target: two
    overlapping marginal intervals can hide a consistent lead. Names:
    ``<method>_minus_<reference>_<steering|concept|steering_lift>`` (+ ``_ci_low`` /
    ``_ci_high``); ``reference`` is the random floor by default, LoRA in the comparison."""
    floor = chosen_by_method.get(reference)
    out: dict[str, float] = {}
    if floor is None:
        return out
    for method, per_target in chosen_by_method.items():
        if method == reference:
            continue
        for kind, key in (
            ("steering", "score"),
            ("concept", "concept"),
            ("steering_lift", "score_lift"),
        ):
            diffs = [a[key] - b[key] for a, b in zip(per_target, floor, strict=True)]
            name = f"{method}_minus_{reference}_{kind}"
            out[name], out[f"{name}_ci_low"], out[f"{name}_ci_high"] = _mean_and_interval(
                diffs, seed
            )
    return out


def per_factor_table(
    rows: list[Row], ratings: list[dict[str, float]], methods: list[str], seed: int
) -> dict[str, list[Any]]:
    """Per (method, factor): the mean of each rating over every generation (both halves), with
    a bootstrap interval of the concept and fluency ratings over targets (each target's mean
    first, so that one target's instructions do not count as independent draws); and, where a
    random direction ran at the same factor, the concept lead over it paired by target
    (``concept_minus_random``): at one factor DiffMean's and the random vector have the same
    norm (α·s), so this is the direction's own effect on the concept, apart from how hard the
    push is. The SAE's vector has norm α·m_i, not α·s: its lead over the random direction is
    ``concept_minus_random_unequal_norm``, and its ``concept_minus_random`` is NaN. And the
    concept's rise over the method's smallest factor, paired by target (``concept_rise``)."""
    by_factor: dict[tuple[str, float], list[tuple[int, dict[str, float]]]] = defaultdict(list)
    for row, r in zip(rows, ratings, strict=True):
        by_factor[(row.method, row.factor)].append((row.target, r))
    # Concept mode's random direction runs at every factor on both halves; latent mode's floor
    # only at the SAE's α* on the test half, which no per-factor lead can be paired with.
    floor_per_factor = any(row.method == RANDOM and row.split == "dev" for row in rows)

    def target_means(cell: list[tuple[int, dict[str, float]]], kind: str) -> dict[int, float]:
        per_target: dict[int, list[float]] = defaultdict(list)
        for t, r in cell:
            per_target[t].append(r[kind])
        return {t: _mean(v) for t, v in per_target.items()}

    def concept_lead(
        cell: list[tuple[int, dict[str, float]]], other: list[tuple[int, dict[str, float]]]
    ) -> tuple[float, float, float]:
        """Mean and interval over targets of (cell's concept mean − other's)."""
        mine, theirs = target_means(cell, "concept"), target_means(other, "concept")
        return _mean_and_interval([mine[t] - theirs[t] for t in mine if t in theirs], seed)

    undefined = (math.nan, math.nan, math.nan)
    # Each steered method's smallest non-zero factor: the base of its concept rise.
    first_factor: dict[str, float] = {}
    for m, f in by_factor:
        if is_factor_method(m) and f != 0:
            first_factor[m] = min(f, first_factor.get(m, f))

    table: dict[str, list[Any]] = defaultdict(list)
    for (method, factor), cell in sorted(
        by_factor.items(), key=lambda kv: (methods.index(kv[0][0]), kv[0][1])
    ):
        table["method"].append(method)
        table["factor"].append(factor)
        table["n"].append(len(cell))
        for k in (*RATING_KINDS, "score"):
            table[k].append(_mean([r[k] for _t, r in cell]))
        for k in ("concept", "fluency"):
            low, high = bootstrap_interval(list(target_means(cell, k).values()), seed)
            table[f"{k}_ci_low"].append(low)
            table[f"{k}_ci_high"].append(high)
        steered = is_factor_method(method) and factor != 0
        floor = by_factor.get((RANDOM, factor)) if floor_per_factor else None
        lead = (
            concept_lead(cell, floor)
            if steered and method != RANDOM and floor is not None
            else undefined
        )
        # Only DiffMean shares the random direction's norm (α·s) at one factor; the SAE's
        # vector is α·m_i, so its lead is logged under a name that claims no equal norm.
        latent_norm = method == SAE or method.startswith(SUPERVISED_PREFIX)
        equal_norm, unequal_norm = (undefined, lead) if latent_norm else (lead, undefined)
        # Does pushing harder raise the concept? Against the method's smallest factor.
        first = first_factor.get(method)
        rise = (
            concept_lead(cell, by_factor[(method, first)])
            if steered and first is not None and factor != first
            else undefined
        )
        for name, (value, low, high) in (
            ("concept_minus_random", equal_norm),
            ("concept_minus_random_unequal_norm", unequal_norm),
            ("concept_rise", rise),
        ):
            table[name].append(value)
            table[f"{name}_ci_low"].append(low)
            table[f"{name}_ci_high"].append(high)
    return dict(table)


def generations_table(
    rows: list[Row], texts: list[str], ratings: list[dict[str, float]], targets: list[Target]
) -> dict[str, list[Any]]:
    """Every generation with its ratings, so that a run can be re-judged later."""
    table: dict[str, list[Any]] = defaultdict(list)
    for row, text, r in zip(rows, texts, ratings, strict=True):
        target = targets[row.target]
        table["concept"].append(target.concept)
        table["method"].append(row.method)
        table["latent"].append(_method_latent(target, row.method))
        table["instruction"].append(row.instruction.text)
        table["split"].append(row.split)
        table["factor"].append(row.factor)
        table["prompt"].append(row.prompt)
        table["text"].append(text)
        for k in (*RATING_KINDS, "score"):
            table[k if k == "score" else f"{k}_rating"].append(r[k])
    return dict(table)


def judge_steering_prompts(targets: list[Target], judge: Judge) -> dict[str, str]:
    """Concept -> the steering prompt the judge's LLM wrote for it, for the concepts where it
    wrote one (none for the offline judge, whose prompting reference uses the template)."""
    written = {}
    for concept in dict.fromkeys(t.concept for t in targets):
        prompt = judge.steering_prompt(concept)
        if prompt:
            written[concept] = prompt
    return written


def latent_floor_rows(
    rows: list[Row], ratings: list[dict[str, float]], targets: list[Target]
) -> list[Row]:
    """The latent-mode floor: per target with a random direction, one row per test
    instruction at each of the SAE's α* (by the score and by lift, chosen on the dev half as
    :func:`summarize` chooses them), for the random method."""
    add_concept_lift(rows, ratings)
    cells = _cells(rows, ratings)
    out = []
    for t_index, target in enumerate(targets):
        factors = _factors(cells, SAE, t_index)
        if target.random_D is None or not factors:
            continue
        alphas = [best_factor(_dev_means(cells, SAE, t_index, factors, k)) for k in _ALPHA_KEYS]
        for alpha in dict.fromkeys(alphas):
            for instruction in target.split.test:
                out.append(Row(RANDOM, t_index, instruction, "test", alpha, instruction.text))
    return out


@dataclass
class ProtocolJob:
    """One SAE's steering run carried through the protocol's stages (rows, generations,
    ratings, floor, scores) beside other runs on the same LM and layer: :func:`run_protocols`
    takes each stage for every job at once, so their generations share batches and their
    ratings one judge call (a study's ten SAEs: one batched pass where there were ten)."""

    targets: list[Target]
    sae: SparseAutoencoder
    config: SteerConfig
    reference_scale: float
    # Concept -> the judge LLM's steering prompt; None until asked (set-up may ask first).
    steering_prompts: dict[str, str] | None = None
    rows: list[Row] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    ratings: list[dict[str, float]] = field(default_factory=list)
    unparsable: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def _generate_jobs(
    jobs: list[ProtocolJob], rows_per_job: list[list[Row]], lm: LoadedLM, layer: int
) -> list[list[str]]:
    """Every job's continuations; the added-vector generations of all jobs with one generation
    config run as one batched :func:`generate_added` call (its memo then serves each job's
    own call). Each job's ``generation`` seconds get the shared call's time in proportion to
    its rows."""
    plans = [
        plan_generations(rows, job.targets, job.sae, lm.d_model, job.config, job.reference_scale)
        for job, rows in zip(jobs, rows_per_job, strict=True)
    ]
    by_settings: dict[GenerationConfig, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        by_settings[_generation_config(job.config)].append(i)
    for generation, members in by_settings.items():
        prompts = [p for i in members for p in plans[i].add_prompts]
        if len(members) < 2 or not prompts:
            continue
        started = time.perf_counter()
        vectors = torch.stack([v for i in members for v in plans[i].add_vectors])
        generate_added(
            lm, prompts, vectors, generation, layer=layer, progress="steer: generate (batched)"
        )
        shared = time.perf_counter() - started
        for i in members:
            jobs[i].seconds["generation"] += shared * len(plans[i].add_prompts) / len(prompts)
    out = []
    for job, plan in zip(jobs, plans, strict=True):
        started = time.perf_counter()
        out.append(_plan_texts(plan, job.sae, lm, layer, job.config))
        job.seconds["generation"] += time.perf_counter() - started
    return out


def _rate_jobs(
    jobs: list[ProtocolJob],
    rows_per_job: list[list[Row]],
    texts_per_job: list[list[str]],
    judge: Judge,
) -> list[tuple[list[dict[str, float]], int]]:
    """Every job's ratings from one judge call over all their questions."""
    started = time.perf_counter()
    per_job = [
        rating_questions(rows, texts, job.targets)
        for job, rows, texts in zip(jobs, rows_per_job, texts_per_job, strict=True)
    ]
    answers = ask_judge([q for questions in per_job for q in questions], judge)
    shared = time.perf_counter() - started
    total = max(1, sum(map(len, per_job)))
    out = []
    for job, rows, texts, questions in zip(jobs, rows_per_job, texts_per_job, per_job, strict=True):
        job.seconds["judge"] += shared * len(questions) / total
        out.append(rate_rows(rows, texts, job.targets, judge, answers))
    return out


def run_protocols(
    jobs: list[ProtocolJob], lm: LoadedLM, layer: int, judge: Judge
) -> list[SteeringResult]:
    """Generate, rate and score every row of every job (their targets' splits already set),
    each stage for all jobs at once; a job's result is the one it would get alone (per-prompt
    sampling seeds: a continuation does not depend on its batch neighbours, up to the float
    rounding of a batch's shape, which on a real LM can flip a sampled token at a near-tie)."""
    for job in jobs:
        config = job.config
        if config.mode == "concept" and job.steering_prompts is None:
            job.steering_prompts = judge_steering_prompts(job.targets, judge)
        job.rows = build_rows(job.targets, config, config.mode, job.steering_prompts)
    texts = _generate_jobs(jobs, [job.rows for job in jobs], lm, layer)
    rated = _rate_jobs(jobs, [job.rows for job in jobs], texts, judge)
    for job, job_texts, (ratings, unparsable) in zip(jobs, texts, rated, strict=True):
        job.texts, job.ratings, job.unparsable = job_texts, ratings, unparsable
    floored = [job for job in jobs if job.config.mode == "latent" and job.config.random_floor]
    if floored:
        floor_rows = [latent_floor_rows(job.rows, job.ratings, job.targets) for job in floored]
        before = {id(job): (job.seconds["generation"], job.seconds["judge"]) for job in floored}
        floor_texts = _generate_jobs(floored, floor_rows, lm, layer)
        floor_rated = _rate_jobs(floored, floor_rows, floor_texts, judge)
        for job, rows, job_texts, (ratings, unparsable) in zip(
            floored, floor_rows, floor_texts, floor_rated, strict=True
        ):
            job.rows, job.texts = job.rows + rows, job.texts + job_texts
            job.ratings, job.unparsable = job.ratings + ratings, job.unparsable + unparsable
            # The floor's generation and rating are counted apart (``floor_seconds``).
            generation, judging = before[id(job)]
            job.seconds["floor"] += (
                job.seconds["generation"] - generation + job.seconds["judge"] - judging
            )
            job.seconds["generation"], job.seconds["judge"] = generation, judging
    results = []
    for job in jobs:
        result = summarize(job.rows, job.ratings, job.targets, job.config.seed)
        result.tables["generations"] = generations_table(
            job.rows, job.texts, job.ratings, job.targets
        )
        result.metrics.update(
            {
                "n_targets": float(len(job.targets)),
                "n_generations": float(len(job.rows)),
                "unparsable_ratings": float(job.unparsable),
                "generation_seconds": job.seconds["generation"],
                "judge_seconds": job.seconds["judge"],
                "floor_seconds": job.seconds["floor"],
                "reference_scale": job.reference_scale,
                "judge_written_prompts": float(len(job.steering_prompts or {})),
                "batched_runs": float(len(jobs)),
            }
        )
        results.append(result)
    logger.info(
        "steering: %d runs, %d generations",
        len(jobs),
        sum(len(job.rows) for job in jobs),
    )
    return results


def run_protocol(
    targets: list[Target],
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    judge: Judge,
    config: SteerConfig,
    reference_scale: float,
) -> SteeringResult:
    """Generate, rate and score every row for ``targets`` (their splits already set): one
    job of :func:`run_protocols`."""
    (result,) = run_protocols(
        [ProtocolJob(targets, sae, config, reference_scale)], lm, layer, judge
    )
    return result
