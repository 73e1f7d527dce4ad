"""How long `analyze` takes over a tracking store of ~5,000 runs (issue target: ≤ 10 s here).

    python bench/bench_analyze.py [--store /tmp/saeflow-bench-analyze.db] [--repeat 3]

The store is filled once by analysis/synthetic.py (registered versions with eval and steer runs
written through the MLflow client as `evaluate` and `steer` write them) and reused on later
calls; filling it takes a few minutes. The timed part is one `analyze` call end to end: paged
search_runs, registry queries, statistics (default 2,000 resamples), plots, the HTML report and
logging the analyze run. Each call prints wall and process CPU seconds per phase and the load
average around it: on a shared machine wall time is an upper bound, and CPU time (what this
process itself spent, all its threads) the better estimate of the unloaded wall time.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from analysis.analyze import AnalyzeConfig, analyze
from analysis.synthetic import SyntheticStudy, write_study
from bench.figures import Figure, met_target, speedup_from_seconds
from project.tracking import configure_tracking, init_schema

EXPERIMENT = "synthetic-study"
TARGET_SECONDS = 10.0
# 10 LMs x 5 architectures x 13 sparsities = 650 versions; per version 1 training run,
# 4 eval runs and 3 steer runs (selections): 5,200 runs, plus the registry's 650 versions.
STUDY = SyntheticStudy(
    lms=tuple(f"lm-{i}" for i in range(10)),
    target_l0s=(8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512),
    selections=("none", "dtc", "output_score"),
    eval_runs_per_version=4,
)


def _load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def open_store(store: str) -> tuple[MlflowClient, int]:
    """The synthetic study's store at ``store`` (written on first use), and its run count."""
    uri = f"sqlite:///{Path(store).resolve()}"
    fresh = not Path(store).exists()
    configure_tracking(uri)
    init_schema(uri)
    client = MlflowClient()
    if fresh:
        start = time.perf_counter()
        n = write_study(client, EXPERIMENT, STUDY)
        print(f"wrote {n} runs in {time.perf_counter() - start:.0f} s")
    study = client.get_experiment_by_name(EXPERIMENT)
    n_runs = len(client.search_runs([study.experiment_id], max_results=50_000))
    return client, n_runs


def measure(store: str = "/tmp/saeflow-bench-analyze.db", repeat: int = 2) -> list[Figure]:
    """The fastest of ``repeat`` analyze calls over the synthetic store, against issue 19's
    10-second budget (its reference: there is no other implementation to time)."""
    _client, n_runs = open_store(store)
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        analyze(AnalyzeConfig(experiments=EXPERIMENT, selection="dtc"))
        seconds.append(time.perf_counter() - started)
    best = min(seconds)
    ratio = speedup_from_seconds(best, TARGET_SECONDS)
    return [
        Figure(
            section="analyze",
            what=f"analyze over {n_runs:,} runs (τ_b, Ψ, report, logging)",
            saeflow=best,
            reference=TARGET_SECONDS,
            reference_name="issue 19's budget",
            unit="s",
            ratio=ratio,
            target=1.0,
            met=met_target(ratio, 1.0),
            note=f"best of {repeat} calls",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="/tmp/saeflow-bench-analyze.db")
    parser.add_argument("--repeat", type=int, default=3, help="analyze calls to time (≥ 1)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    logging.basicConfig(level=logging.WARNING)
    _client, n_runs = open_store(args.store)
    print(f"store {args.store}: {n_runs} runs in {EXPERIMENT!r}; {os.cpu_count()} CPUs")
    for call in range(1, args.repeat + 1):
        load_before = _load()
        wall, cpu = time.perf_counter(), time.process_time()
        result = analyze(AnalyzeConfig(experiments=EXPERIMENT, selection="dtc"))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        h, times = result.report.headline, result.times
        phases = ", ".join(
            f"{name} {times.wall[name]:.2f} ({times.cpu[name]:.2f})" for name in times.wall
        )
        print(
            f"call {call}: analyze over {n_runs} runs ({int(h['n_saes'])} SAEs, "
            f"{len(result.report.groups)} groups): {wall:.2f} s wall, {cpu:.2f} s CPU "
            f"(target ≤ {TARGET_SECONDS:.0f} s); τ_b {h['tau_b']:.4f} "
            f"[{h['tau_b_ci_low']:.4f}, {h['tau_b_ci_high']:.4f}]\n"
            f"  phases, wall (CPU) s: {phases}\n"
            f"  load average (1, 5, 15 min) before {load_before}, after {_load()}"
        )


if __name__ == "__main__":
    main()
