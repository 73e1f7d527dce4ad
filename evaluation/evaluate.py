"""Temporary re-export: evaluation/probing/probe.py and bench/bench_probe.py import these run
helpers from here; they live in project/runs.py. The ``evaluate`` entry point is
evaluation/interpretability/evaluate.py."""

# temporary: evaluation/probing imports this; removed when probing moves
from project.runs import (
    config_hash,
    find_finished_run,
    parent_run,
    resolve_versions,
    run_tags,
    version_site,
)

__all__ = [
    "config_hash",
    "find_finished_run",
    "parent_run",
    "resolve_versions",
    "run_tags",
    "version_site",
]
