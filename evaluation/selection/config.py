"""Settings of the per-latent statistics table and the selection scores, checked before any
work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from project.checks import check_int
from project.corpus import DEFAULT_CORPUS

DTC_VARIANTS = ("in_place", "decoded_alone")
DTC_REFERENCES = ("max_activation", "prefix")
POSITIONS = ("last", "all")
NEUTRAL_PREFIX = "From my experience,"


def _check_number(name: str, value: object, low: float, *, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if value < low or (strict and value == low):
        raise ValueError(f"{name}={value!r} must be {'>' if strict else '>='} {low}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


@dataclass(frozen=True)
class LatentStatsConfig:
    """Where and how much held-out text measures each latent's max activation m_i and firing
    frequency (the eval region of ``corpus``; BOS / EOS / pad positions never count)."""

    corpus: str = DEFAULT_CORPUS
    text_column: str = "text"
    n_tokens: int = 16_384
    context_size: int = 128
    lm_batch_size: int = 16

    def __post_init__(self) -> None:
        check_int("stats_n_tokens", self.n_tokens, 1)
        check_int("stats_context_size", self.context_size, 2)
        check_int("stats_lm_batch_size", self.lm_batch_size, 1)


@dataclass(frozen=True)
class SelectionConfig:
    """What the per-latent scores are computed with. Paper values are the defaults.

    - ``prefix``: the neutral prefix of the output score and DTC ("From my experience,").
    - ``output_scale``: s of the output score (Arad et al.: 10): at the prefix's last position
      latent i gets ``s · max_j f_j`` added, the SAE error term kept.
    - ``lens_tokens``: |ℓ(i)|, the logit-lens tokens of the input and output scores (20).
    - ``alpha``, ``k``: DTC's α (10) and the k of ``C_k`` (1).
    - ``dtc_reference``: the coefficient DTC amplifies. The paper sets latent i's code to α
      times its coefficient; on a six-token prefix nearly every latent is silent, so the
      literal reading (``prefix``: α · f_i(x)) leaves almost all at ΔC = 0. ``max_activation``
      (default, saeflow's choice) uses α · m_i, the scale steering adds (METHODS §3).
    - ``dtc_positions``: where DTC intervenes, ``last`` (default: the position whose
      next-token distribution is read, like the output score) or ``all`` prefix positions.
    - DTC is computed in both interventions of the paper: ``in_place`` (§4.1, latent i's code
      replaced in the reconstruction, the error term kept: ``x + (α c_i − f_i) W_dec,i``) and
      ``decoded_alone`` (Appendix D: the residual replaced by ``decode(α c_i e_i)``).
    - ``corpus`` / ``text_column`` / ``n_tokens`` / ``context_size``: held-out text (the
      corpus's eval region) scanned for max activation m_i, firing frequency and the input
      score's top-activating examples; special tokens never count (the steering table's
      definition). ``example_tokens``: length of one example (a scan window is cut into
      examples). ``input_examples`` (100) / ``input_min_examples`` (10): Arad et al.'s
      first-100 examples and the minimum below which a latent gets no input score (NaN).
    - ``batch_latents``: latents per batched pass; ``lm_batch_size``: windows per LM pass.
    """

    prefix: str = NEUTRAL_PREFIX
    output_scale: float = 10.0
    lens_tokens: int = 20
    alpha: float = 10.0
    k: int = 1
    dtc_reference: str = "max_activation"
    dtc_positions: str = "last"
    corpus: str = DEFAULT_CORPUS
    text_column: str = "text"
    n_tokens: int = 32_768
    context_size: int = 128
    example_tokens: int = 32
    input_examples: int = 100
    input_min_examples: int = 10
    # Fewer, larger matrix products: all 2,304 latents of a study SAE in 7.3 s against
    # 8.5 s at 64, the same output scores and the same study selections (stop 31).
    batch_latents: int = 256
    lm_batch_size: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not self.prefix.strip():
            raise ValueError(f"prefix={self.prefix!r} must be a non-empty text")
        _check_number("output_scale", self.output_scale, 0.0, strict=True)
        _check_number("alpha", self.alpha, 0.0)
        _check_choice("dtc_reference", self.dtc_reference, DTC_REFERENCES)
        _check_choice("dtc_positions", self.dtc_positions, POSITIONS)
        for name, low in (
            ("lens_tokens", 1),
            ("k", 1),
            ("n_tokens", 1),
            ("context_size", 2),
            ("example_tokens", 1),
            ("input_examples", 1),
            ("input_min_examples", 1),
            ("batch_latents", 1),
            ("lm_batch_size", 1),
        ):
            check_int(name, getattr(self, name), low)
        if self.input_min_examples > self.input_examples:
            raise ValueError(
                f"input_min_examples={self.input_min_examples} exceeds "
                f"input_examples={self.input_examples}"
            )
        if not self.corpus or not self.text_column:
            raise ValueError("corpus and text_column must be non-empty")
