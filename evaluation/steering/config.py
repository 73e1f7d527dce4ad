"""Settings of the steering evaluation (METHODS.md §3), checked before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from evaluation.selection.config import LatentStatsConfig
from project.checks import check_bool, check_device, check_int
from project.cli import parse_list
from project.lm import lm_dtype

MODES = ("latent", "concept")
INTERVENTIONS = ("add", "clamp")
# AxBench's factor grids at paper scale (addition; clamping).
AXBENCH_ADD_FACTORS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 4.0, 5.0)
AXBENCH_CLAMP_FACTORS = (0.4, 0.8, 1.2, 1.6, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 100.0)
# The CPU default: five points where the action is on SmolLM2 at a mid-depth layer (10 of 30):
# the concept rating rises up to α 3-4 (× m_i) and the text breaks by α 6; α 8 was broken for
# every method in every measured run (README, Steer).
CPU_FACTORS = (1.0, 2.0, 3.0, 4.0, 6.0)
# saeflow's own steering prompt for the prompting reference; AxBench's frame around it.
DEFAULT_PROMPT_TEMPLATE = (
    "Whatever the question, make your answer clearly about {concept}.\n\nQuestion: {instruction}"
)


@dataclass(frozen=True)
class SteerConfig:
    """One steering evaluation. CPU defaults; AxBench's paper scale is ``n_instructions=10``,
    ``max_new_tokens=128``, ``factors=AXBENCH_ADD_FACTORS``, 100 concepts.

    - ``mode``: ``concept`` (concepts with labelled texts; the SAE's latent is the best
      max-pooled AUROC one; DiffMean, a random direction and prompting run beside it) or
      ``latent`` (sampled live latents, each steered toward its own autointerp explanation).
    - ``selection``: which latents are candidates (``none``: every live latent; see
      :mod:`evaluation.selection.registry`).
    - ``intervention``: ``add`` (``x + α·m_i·v_i``) or ``clamp`` (latent i set to ``α·m_i``,
      the SAE error kept) for the SAE method; references always add.
    - ``n_concepts``: concepts (concept mode) or latents (latent mode) steered.
    - ``n_instructions``: per concept, a concept-seeded sample of the pool, the first half dev
      and the rest test (AxBench: 10).
    - ``concepts``: ``stdlib`` (the shipped set) or a jsonl file (``concept``, ``positives``,
      ``negatives``, optional ``genre``); ``instructions``: ``builtin`` or a .json/.jsonl/.txt file.
    - ``explain_pool`` (latent mode): candidates explained per SAE, from which the steered
      ``n_concepts`` are sampled with a seeded RNG (the interpretability-vs-utility paper
      explains 1,000 latents and samples 100); 0 means ``2 · n_concepts``. Explanations whose
      tokens ordinary text already holds are skipped (:mod:`evaluation.steering.latent_targets`).
    - ``n_examples``: positive (and negative) texts per concept, cut to ``example_tokens``.
    - ``supervised_k`` (concept mode): for each K, the method ``sae_sup_k<K>`` steers the K
      latents that supervised select-and-label picks for the concept (calibrated F1 of their
      token-level firing against the concept's own positives and negatives, π0 tuned on a
      held-out split, at least ``supervised_min_support`` positive supports; METHODS §4), all
      at once: the sum of their ``α·m_i·v_i`` (always by addition). Empty: not run.
    - ``trained`` (concept mode): trained reference methods, ``lora`` and/or ``loreft``
      (:mod:`evaluation.steering.trained`), each trained per concept on ``trained_pairs``
      written responses (kept where the judge rates the concept ≥ 1) to instructions disjoint
      from the concept's dev and test ones, ``trained_response_tokens`` long; factor-less, so
      each factor row is another sample and α* picks among them on the dev half (AxBench).
      Where fewer than ``trained_min_pairs`` are kept, pairs of a training instruction and
      one of the concept's positive example texts fill up to it (counted, in the run's
      ``training_pairs`` table as ``concept examples``); 0 turns that off.
      ``trained_epochs`` / ``trained_lr``: 0 takes the method's CPU default;
      ``trained_layers``: the blocks they train at (empty: four spread over the depth, as
      AxBench's 5/10/15/20 of 26), checked against the LM before any generation.
    - ``random_floor`` (latent mode): after the SAE's rows are rated, steer each target's
      seeded random direction at the latent's own norm (``α·m_i``) and the SAE's own α* (by
      the score and by lift) on the same test instructions: the floor of its test score and
      concept lift (a concept that any push of that size writes is not the latent's doing).
    - ``lm_dtype`` (``float32`` or ``bfloat16``) and ``device`` (``cpu``, ``cuda``, ``auto``):
      how the steered LM is loaded where this run loads it (issue 19's GPU path); its
      generation, the trained methods and the offline judge's fluency pass run in that dtype
      on that device. bfloat16 changes the LM's fingerprint, so its runs never reuse float32's.
    - ``compile``: generate under ``torch.compile`` of the LM's forward (the GPU path; its first
      batch pays the compilation). Not with ``trained`` methods, whose adapters hook the LM's
      projections per batch.
    """

    mode: str = "concept"
    selection: str = "none"
    intervention: str = "add"
    n_concepts: int = 6
    factors: tuple[float, ...] = CPU_FACTORS
    n_instructions: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0
    # Rows per generation batch. SmolLM2's plain batched decode here: 167 tok/s at 48,
    # 185 at 96, 175 at 192 (stop 31, 192 prompts x 24 tokens).
    batch_size: int = 96
    concepts: str = "stdlib"
    instructions: str = "builtin"
    explain_pool: int = 0
    n_examples: int = 16
    example_tokens: int = 64
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    random_floor: bool = True
    supervised_k: tuple[int, ...] = ()
    supervised_min_support: int = 50
    trained: tuple[str, ...] = ()
    trained_pairs: int = 48
    trained_min_pairs: int = 24
    trained_response_tokens: int = 64
    trained_epochs: int = 0
    trained_lr: float = 0.0
    trained_layers: tuple[int, ...] = ()
    lm_dtype: str = "float32"
    device: str = "cpu"
    compile: bool = False
    stats: LatentStatsConfig = field(default_factory=LatentStatsConfig)

    def __post_init__(self) -> None:
        from evaluation.selection.registry import check_selection

        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid modes: {', '.join(MODES)}")
        if self.intervention not in INTERVENTIONS:
            raise ValueError(
                f"unknown intervention {self.intervention!r}; valid: {', '.join(INTERVENTIONS)}"
            )
        check_selection(self.selection)
        for name, low in (
            ("n_concepts", 1),
            ("n_instructions", 2),
            ("max_new_tokens", 1),
            ("seed", 0),
            ("batch_size", 1),
            ("n_examples", 2),
            ("example_tokens", 4),
            ("explain_pool", 0),
        ):
            check_int(name, getattr(self, name), low)
        check_int("supervised_min_support", self.supervised_min_support, 1)
        for k in self.supervised_k:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(
                    f"supervised_k has K={k!r}; each K (latents steered together per concept) "
                    "must be an integer >= 1"
                )
        self._check_concept_methods("supervised_k", self.supervised_k)
        self._check_trained()
        lm_dtype(self.lm_dtype)
        check_device(self.device)
        check_bool("compile", self.compile)
        if self.compile and self.trained:
            raise ValueError(
                f"compile=true with trained={list(self.trained)}: the trained methods' adapters "
                "hook the LM per batch, which the compiled forward does not cover; drop one"
            )
        check_bool("random_floor", self.random_floor)
        if not self.factors:
            raise ValueError("factors is empty; give at least one steering factor")
        for f in self.factors:
            if isinstance(f, bool) or not isinstance(f, int | float) or not math.isfinite(f):
                raise ValueError(f"factor {f!r} is not a finite number (factors={self.factors})")
            if f < 0:
                raise ValueError(f"factor {f!r} is negative (factors={self.factors})")
        if len(set(self.factors)) != len(self.factors):
            raise ValueError(f"factors {self.factors} repeat a value")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, int | float)
            or not 0 <= self.temperature <= 10
        ):
            raise ValueError(f"temperature={self.temperature!r} must lie in [0, 10] (0 = greedy)")
        if "{concept}" not in self.prompt_template or "{instruction}" not in self.prompt_template:
            raise ValueError(
                f"prompt_template {self.prompt_template!r} must contain {{concept}} and "
                "{instruction}"
            )

    def _check_concept_methods(self, name: str, values: tuple[object, ...]) -> None:
        """Options that add methods of concept mode: no value twice, and concept mode."""
        if len(set(values)) != len(values):
            raise ValueError(f"{name} {values} repeats a value")
        if values and self.mode != "concept":
            raise ValueError(
                f"{name}={values} needs mode=concept (labelled concepts); mode is {self.mode!r}"
            )

    def _check_trained(self) -> None:
        from evaluation.steering.trained.config import METHODS as TRAINED_METHODS

        for method in self.trained:
            if method not in TRAINED_METHODS:
                raise ValueError(
                    f"unknown trained method {method!r}; valid: {', '.join(TRAINED_METHODS)}"
                )
        self._check_concept_methods("trained", self.trained)
        check_int("trained_pairs", self.trained_pairs, 2)
        check_int("trained_min_pairs", self.trained_min_pairs, 0)
        if self.trained_min_pairs > self.trained_pairs:
            raise ValueError(
                f"trained_min_pairs={self.trained_min_pairs} exceeds trained_pairs="
                f"{self.trained_pairs}: the top-up answers the written pairs' instructions"
            )
        check_int("trained_response_tokens", self.trained_response_tokens, 4)
        check_int("trained_epochs", self.trained_epochs, 0)
        for layer in self.trained_layers:
            check_int("trained_layers[...]", layer, 0)
        lr = self.trained_lr
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 <= lr <= 1:
            raise ValueError(f"trained_lr={lr!r} must lie in [0, 1] (0: the method's default)")


def parse_factors(text: str) -> tuple[float, ...]:
    """Comma-separated factors; ``axbench`` (the 14 addition values) or ``axbench_clamp``.

    Raises:
        ValueError: a part that is not a number, naming it.
    """
    named = {"axbench": AXBENCH_ADD_FACTORS, "axbench_clamp": AXBENCH_CLAMP_FACTORS}
    if text.strip() in named:
        return named[text.strip()]
    return parse_list(
        text, float, "factors", f"number (or give one of {', '.join(named)} for the whole list)"
    )
