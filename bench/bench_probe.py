"""Where the time of a probing regime goes: every method on every cell of one (dataset, regime).

    MLFLOW_TRACKING_URI=sqlite:////tmp/probe_mlflow.db OMP_NUM_THREADS=1 \\
        python bench/bench_probe.py --model_uri models:/NAME/1 --dataset 92_glue_sst2 --regime scarcity

Activations come from (and go to) the probe's own cache, so a second call times the probes
only. Prints one line per (cell, method): seconds, validation and test AUC, chosen setting;
then the total per method.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict

from evaluation.evaluate import resolve_versions, version_site
from evaluation.probing import activations
from evaluation.probing.config import ProbeConfig
from evaluation.probing.datasets import load_all
from evaluation.probing.methods import run_baseline, sae_probe
from evaluation.probing.regimes import check_plan
from project.lm import load_lm
from project.registry import load_version
from project.tracking import configure_tracking


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_uri", required=True)
    parser.add_argument("--dataset", default="92_glue_sst2")
    parser.add_argument("--regime", default="scarcity")
    parser.add_argument("--baselines", default="logreg,pca_logreg,knn,mlp")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    configure_tracking()

    config = ProbeConfig(datasets=args.dataset, regimes=(args.regime,), baselines=args.baselines)
    datasets = load_all(config.datasets, config.max_rows)
    plan = check_plan(datasets, config)[args.regime]
    (mv,) = resolve_versions(args.model_uri)[:1]
    lm_name, layer = version_site(mv)
    lm = load_lm(lm_name)
    d = datasets[0]
    X = activations.harvest(lm, layer, d.texts, config.max_seq_len, config.batch_size, d.name)
    X_ood = None
    if d.ood_texts is not None:
        X_ood = activations.harvest(
            lm, layer, d.ood_texts, config.max_seq_len, config.batch_size, d.name
        )
    sae = load_version(mv)
    Z = activations.encode(sae, X)
    Z_ood = None if X_ood is None else activations.encode(sae, X_ood)
    ks = config.standard_ks if args.regime == "standard" else config.regime_ks
    names = config.noise_baselines if args.regime == "noise" else config.baselines

    totals: dict[str, float] = defaultdict(float)
    for trial in plan:
        test_X = X_ood if trial.test_idx is None else X[trial.test_idx]
        test_Z = Z_ood if trial.test_idx is None else Z[trial.test_idx]
        for name in names:
            t0 = time.perf_counter()
            r = run_baseline(name, X[trial.train_idx], trial.y_train, test_X, trial.y_test, 42)
            dt = time.perf_counter() - t0
            totals[name] += dt
            print(
                f"{trial.value:>7g} {name:>12} {dt:7.2f}s val {r.val_auc:.3f} test {r.test_auc:.3f} {r.params}"
            )
        t0 = time.perf_counter()
        results = sae_probe(Z[trial.train_idx], trial.y_train, test_Z, trial.y_test, ks, 42)
        dt = time.perf_counter() - t0
        totals["sae_probes"] += dt
        for r in results:
            params = {k: v for k, v in r.params.items() if k != "latents"}
            print(
                f"{trial.value:>7g} {r.method:>12}          val {r.val_auc:.3f} test {r.test_auc:.3f} {params}"
            )
        print(f"{trial.value:>7g} {'sae (all k)':>12} {dt:7.2f}s")
    print("total per method:", {k: round(v, 2) for k, v in totals.items()})


if __name__ == "__main__":
    main()
