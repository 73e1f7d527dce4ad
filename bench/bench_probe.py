"""Where the time of the probing regimes goes: every method on every cell, wall and CPU seconds.

    MLFLOW_TRACKING_URI=sqlite:////tmp/probe_mlflow.db \\
        python bench/bench_probe.py --model_uri models:/NAME/1 --datasets 92_glue_sst2 \\
        --regimes scarcity,noise

Activations come from (and go to) the probe's own cache, so a second call times the probes
only. Logs one line per (cell, method): wall and CPU seconds, validation and test AUC, chosen
setting (``--per_cell``); then, per regime, the wall and CPU seconds of every method.

``--fit_threads`` sets the BLAS / OpenMP limit of the fits (evaluation/probing_regimes/threads.py):
``1`` is what the probe uses, ``none`` leaves the libraries at their defaults (two threads per
library on a 2-core machine: the probe's behaviour before the limit). CPU seconds above wall
seconds mean several threads were busy; on a machine shared with other work, compare CPU
seconds as well as wall.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import defaultdict

from evaluation.probing_regimes import activations
from evaluation.probing_regimes.config import ProbeConfig
from evaluation.probing_regimes.datasets import load_all
from evaluation.probing_regimes.methods import run_baseline, sae_probe
from evaluation.probing_regimes.regimes import check_plan
from evaluation.probing_regimes.threads import FIT_THREADS_ENV, fit_thread_limit
from project.lm import load_lm
from project.registry import load_version
from project.runs import resolve_versions, version_site
from project.tracking import configure_tracking

log = logging.getLogger("bench_probe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_uri", required=True)
    parser.add_argument("--datasets", default="92_glue_sst2", help="as ProbeConfig.datasets")
    parser.add_argument("--regimes", default="scarcity")
    parser.add_argument("--baselines", default="logreg,pca_logreg,knn,mlp")
    parser.add_argument("--fit_threads", default="1", help="an integer, or none (no limit)")
    parser.add_argument("--per_cell", action="store_true", help="log every (cell, method)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other ProbeConfig field, e.g. --param noise_fractions=0,0.3",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("evaluation", "project", "mlflow", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ[FIT_THREADS_ENV] = args.fit_threads
    configure_tracking()

    defaults = ProbeConfig()
    extra: dict[str, object] = {}
    for item in args.param:
        key, value = item.split("=", 1)
        default = getattr(defaults, key)  # AttributeError names an unknown field
        # tuple fields parse "a,b" themselves; scalars take their default's type
        extra[key] = value if isinstance(default, tuple) else type(default)(value)
    config = ProbeConfig(
        datasets=args.datasets, regimes=args.regimes, baselines=args.baselines, **extra
    )
    datasets = load_all(config.datasets, config.max_rows)
    plan = check_plan(datasets, config)
    mv = resolve_versions(args.model_uri)[0]
    lm_name, layer = version_site(mv)
    lm = load_lm(lm_name)
    sae = load_version(mv)
    features, latents = {}, {}
    for d in datasets:
        X = activations.harvest(lm, layer, d.texts, config.max_seq_len, config.batch_size, d.name)
        X_ood = None
        if d.ood_texts is not None:
            X_ood = activations.harvest(
                lm, layer, d.ood_texts, config.max_seq_len, config.batch_size, d.name
            )
        features[d.name] = (X, X_ood)
        latents[d.name] = (
            activations.encode(sae, X),
            None if X_ood is None else activations.encode(sae, X_ood),
        )
    log.info("fit threads: %s (%s=%s)", fit_thread_limit(), FIT_THREADS_ENV, args.fit_threads)

    for regime in config.regimes:
        ks = config.standard_ks if regime == "standard" else config.regime_ks
        names = config.noise_baselines if regime == "noise" else config.baselines
        wall: dict[str, float] = defaultdict(float)
        cpu: dict[str, float] = defaultdict(float)
        for trial in plan[regime]:
            X, X_ood = features[trial.dataset]
            Z, Z_ood = latents[trial.dataset]
            test_X = X_ood if trial.test_idx is None else X[trial.test_idx]
            test_Z = Z_ood if trial.test_idx is None else Z[trial.test_idx]
            cell = f"{trial.dataset} {trial.value:>6g}"
            for name in names:
                w0, c0 = time.perf_counter(), time.process_time()
                r = run_baseline(name, X[trial.train_idx], trial.y_train, test_X, trial.y_test, 42)
                dw, dc = time.perf_counter() - w0, time.process_time() - c0
                wall[name] += dw
                cpu[name] += dc
                if args.per_cell:
                    log.info(
                        "%s %12s %7.2fs wall %7.2fs cpu  val %.3f test %.3f %s",
                        *(cell, name, dw, dc, r.val_auc, r.test_auc, r.params),
                    )
            w0, c0 = time.perf_counter(), time.process_time()
            results = sae_probe(Z[trial.train_idx], trial.y_train, test_Z, trial.y_test, ks, 42)
            dw, dc = time.perf_counter() - w0, time.process_time() - c0
            wall["sae_probes"] += dw
            cpu["sae_probes"] += dc
            if args.per_cell:
                for r in results:
                    params = {k: v for k, v in r.params.items() if k != "latents"}
                    log.info(
                        "%s %12s %7.2fs wall %7.2fs cpu  val %.3f test %.3f %s",
                        *(cell, r.method, dw, dc, r.val_auc, r.test_auc, params),
                    )
        load = f"{os.getloadavg()[0]:.1f}"  # the machine may be shared: say how busy
        log.info(
            "%s (%d cells, load %s): %s; total %.1fs wall %.1fs cpu",
            regime,
            len(plan[regime]),
            load,
            ", ".join(f"{k} {wall[k]:.1f}s wall {cpu[k]:.1f}s cpu" for k in wall),
            sum(wall.values()),
            sum(cpu.values()),
        )


if __name__ == "__main__":
    main()
