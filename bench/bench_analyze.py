"""How long `analyze` takes over a tracking store of ~5,000 runs (issue target: ≤ 10 s here).

    python bench/bench_analyze.py [--store /tmp/saeflow-bench-analyze.db] [--runs 5000]

The store is filled once by analysis/synthetic.py (registered versions with eval and steer runs
written through the MLflow client as `evaluate` and `steer` write them) and reused on later
calls; filling it takes a few minutes. The timed part is one `analyze` call end to end: paged
search_runs, registry queries, statistics (default 2,000 resamples), plots, the HTML report and
logging the analyze run.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from analysis.analyze import AnalyzeConfig, analyze
from analysis.synthetic import SyntheticStudy, write_study
from project.tracking import configure_tracking, init_schema

# 10 LMs x 5 architectures x 13 sparsities = 650 versions; per version 1 training run,
# 4 eval runs and 3 steer runs (selections): 5,200 runs, plus the registry's 650 versions.
STUDY = SyntheticStudy(
    lms=tuple(f"lm-{i}" for i in range(10)),
    target_l0s=(8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512),
    selections=("none", "dtc", "output_score"),
    eval_runs_per_version=4,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="/tmp/saeflow-bench-analyze.db")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    uri = f"sqlite:///{Path(args.store).resolve()}"
    fresh = not Path(args.store).exists()
    configure_tracking(uri)
    init_schema(uri)
    client = MlflowClient()
    if fresh:
        start = time.perf_counter()
        n = write_study(client, "synthetic-study", STUDY)
        print(f"wrote {n} runs in {time.perf_counter() - start:.0f} s")
    n_runs = sum(
        len(client.search_runs([e.experiment_id], max_results=50_000))
        for e in client.search_experiments()
    )
    start = time.perf_counter()
    result = analyze(AnalyzeConfig(experiments="synthetic-study", selection="dtc"))
    seconds = time.perf_counter() - start
    h = result.report.headline
    print(
        f"analyze over {n_runs} runs ({int(h['n_saes'])} SAEs, {len(result.report.groups)} "
        f"groups): {seconds:.1f} s  (target ≤ 10 s); τ_b {h['tau_b']:.3f}"
    )


if __name__ == "__main__":
    main()
