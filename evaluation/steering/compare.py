"""Does a supervised SAE selection steer as well as LoRA? One steering run that puts every
method on the same concepts and instructions (METHODS §3-4).

Prompting, LoRA, LoReFT, DiffMean, the SAE latent by AUROC, the SAE latents by supervised
select-and-label (K = 1 and K = 5, steered together) and the random direction run in one
concept-mode steer run (:func:`evaluation.steering.steer.steer`), so they share instructions,
sampling seeds and judge. Beside each method's marginal score, the run logs its paired
difference from LoRA over concepts, by AxBench's score and by concept lift over the unsteered
answer (``<method>_minus_lora_steering[_lift]``, bootstrap intervals), and this table
(``tables/comparison.json``, ``comparison.md``), with AxBench's Gemma-2 figures beside it.

    python -m evaluation.steering.compare --model_uri models:/NAME/VERSION
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from typing import Any

from mlflow.tracking import MlflowClient

from evaluation.steering.config import SteerConfig, parse_factors
from evaluation.steering.protocol import LORA, PROMPT, RANDOM, UNSTEERED, supervised_method
from evaluation.steering.steer import parse_supervised_k, parse_trained, steer
from project.cli import parse_bool, parse_int, parse_prefixed_options, run_entry_point
from project.tracking import DEFAULT_EXPERIMENT, configure_tracking, ui_hint

# AxBench's mean steering scores on Gemma-2 (averages over its four settings; METHODS §3).
AXBENCH_GEMMA2 = {"prompt": 0.894, "loreft": 0.741, "lora": 0.615, "diffmean": 0.239, "sae": 0.165}
# The comparison's CPU defaults: 6 concepts, AxBench's 10 instructions, three factors where the
# SAE and DiffMean act on SmolLM2 at layer 10 (README, Steer).
COMPARE_DEFAULTS = SteerConfig(
    mode="concept",
    n_concepts=6,
    n_instructions=10,
    factors=(1.0, 2.0, 4.0),
    supervised_k=(1, 5),
    trained=("lora", "loreft"),
)
LABELS = {
    PROMPT: "prompting",
    LORA: "LoRA",
    "loreft": "LoReFT",
    "diffmean": "DiffMean",
    "sae": "SAE latent by AUROC",
    RANDOM: "random direction (floor)",
    UNSTEERED: "unsteered",
}


def method_order(config: SteerConfig) -> list[str]:
    """The comparison's rows: the references first, the SAE methods, then the floors."""
    return [
        PROMPT,
        *config.trained,
        "diffmean",
        "sae",
        *(supervised_method(k) for k in config.supervised_k),
        RANDOM,
        UNSTEERED,
    ]


def _prefix(method: str) -> str:
    return "" if method == "sae" else f"{method}_"


def comparison_table(metrics: dict[str, float], config: SteerConfig) -> dict[str, list[Any]]:
    """Per method: steering score and score by concept lift with their intervals, the mean
    concept rating, the paired difference from LoRA in both scores (NaN for LoRA itself or
    where LoRA did not run), and AxBench's Gemma-2 score where it has one."""
    table: dict[str, list[Any]] = {
        k: []
        for k in (
            "method",
            "label",
            "score",
            "score_ci_low",
            "score_ci_high",
            "score_lift",
            "score_lift_ci_low",
            "score_lift_ci_high",
            "concept",
            "minus_lora",
            "minus_lora_ci_low",
            "minus_lora_ci_high",
            "minus_lora_lift",
            "minus_lora_lift_ci_low",
            "minus_lora_lift_ci_high",
            "axbench_gemma2",
        )
    }
    for method in method_order(config):
        p = _prefix(method)
        if f"{p}steering_score" not in metrics:
            continue
        table["method"].append(method)
        label = LABELS.get(method)
        if label is None:  # sae_sup_k<K>
            label = f"SAE, supervised select-and-label, K = {method.rsplit('k', 1)[1]}"
        table["label"].append(label)
        for column, name in (("score", "steering_score"), ("score_lift", "steering_score_lift")):
            for suffix in ("", "_ci_low", "_ci_high"):
                table[f"{column}{suffix}"].append(metrics.get(f"{p}{name}{suffix}", math.nan))
        table["concept"].append(metrics.get(f"{p}concept_score", math.nan))
        for column, kind in (("minus_lora", "steering"), ("minus_lora_lift", "steering_lift")):
            for suffix in ("", "_ci_low", "_ci_high"):
                table[f"{column}{suffix}"].append(
                    metrics.get(f"{method}_minus_lora_{kind}{suffix}", math.nan)
                )
        table["axbench_gemma2"].append(AXBENCH_GEMMA2.get(method, math.nan))
    return table


def _interval(value: float, low: float, high: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "—"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if math.isnan(low):
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(low)}, {fmt.format(high)}]"


def comparison_markdown(table: dict[str, list[Any]]) -> str:
    """The table as markdown, the way the README shows it."""
    lines = [
        "| method | score [95% CI] | by concept lift | − LoRA (score) | − LoRA (lift) | "
        "concept | AxBench Gemma-2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, label in enumerate(table["label"]):

        def cell(column: str, signed: bool = False, row: int = i) -> str:
            return _interval(
                table[column][row],
                table[f"{column}_ci_low"][row],
                table[f"{column}_ci_high"][row],
                signed,
            )

        axbench = table["axbench_gemma2"][i]
        lines.append(
            f"| {label} | {cell('score')} | {cell('score_lift')} | "
            f"{cell('minus_lora', True)} | {cell('minus_lora_lift', True)} | "
            f"{table['concept'][i]:.3f} | {'' if math.isnan(axbench) else f'{axbench:.3f}'} |"
        )
    return "\n".join(lines) + "\n"


def compare(
    model_uri: str,
    config: SteerConfig = COMPARE_DEFAULTS,
    judge: str = "offline",
    *,
    judge_options: dict[str, Any] | None = None,
    force: bool = False,
) -> tuple[str, dict[str, list[Any]]]:
    """Run (or reuse) the comparison's steer run on ``model_uri``; log and return its table.

    Returns:
        (the steer run's id, the comparison table).
    """
    if config.mode != "concept" or LORA not in config.trained or not config.supervised_k:
        raise ValueError(
            "the comparison needs mode=concept, trained methods including lora and at least one "
            f"supervised K; got mode={config.mode!r}, trained={config.trained}, "
            f"supervised_k={config.supervised_k}"
        )
    (result,) = steer(model_uri, config, judge, judge_options=judge_options, force=force)
    client = MlflowClient()
    metrics = client.get_run(result.run_id).data.metrics
    table = comparison_table(metrics, config)
    client.log_table(result.run_id, table, "tables/comparison.json")
    client.log_text(result.run_id, comparison_markdown(table), "comparison.md")
    return result.run_id, table


def main() -> None:
    d = COMPARE_DEFAULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_uri", required=True)
    parser.add_argument("--judge", default="offline")
    parser.add_argument("--n_concepts", type=parse_int, default=d.n_concepts)
    parser.add_argument("--n_instructions", type=parse_int, default=d.n_instructions)
    parser.add_argument("--factors", default=",".join(map(str, d.factors)))
    parser.add_argument("--supervised_k", default=",".join(map(str, d.supervised_k)))
    parser.add_argument("--trained", default=",".join(d.trained))
    parser.add_argument("--trained_pairs", type=parse_int, default=d.trained_pairs)
    parser.add_argument("--trained_min_pairs", type=parse_int, default=d.trained_min_pairs)
    parser.add_argument("--trained_epochs", type=parse_int, default=d.trained_epochs)
    parser.add_argument("--max_new_tokens", type=parse_int, default=d.max_new_tokens)
    parser.add_argument("--concepts", default=d.concepts)
    parser.add_argument("--seed", type=parse_int, default=d.seed)
    parser.add_argument("--force", type=parse_bool, default=False)
    args, extra = parser.parse_known_args()
    config = replace(
        d,
        n_concepts=args.n_concepts,
        n_instructions=args.n_instructions,
        factors=parse_factors(args.factors),
        supervised_k=parse_supervised_k(args.supervised_k),
        trained=parse_trained(args.trained),
        trained_pairs=args.trained_pairs,
        trained_min_pairs=args.trained_min_pairs,
        trained_epochs=args.trained_epochs,
        max_new_tokens=args.max_new_tokens,
        concepts=args.concepts,
        seed=args.seed,
    )
    tracking_uri = configure_tracking(experiment=DEFAULT_EXPERIMENT)
    started = time.perf_counter()
    run_id, table = compare(
        args.model_uri,
        config,
        args.judge,
        judge_options=parse_prefixed_options(extra),
        force=args.force,
    )
    print(comparison_markdown(table))
    print(
        f"steer run {run_id}; {time.perf_counter() - started:.0f}s; browse: {ui_hint(tracking_uri)}"
    )


if __name__ == "__main__":
    run_entry_point(main)
