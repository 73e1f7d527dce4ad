"""Temporary re-export: evaluation/probing/datasets.py imports these from here; they live in
evaluation/interpretability/sparse_probing_tasks.py (SAEBench's k-sparse probing tasks)."""

# temporary: evaluation/probing imports this; removed when probing moves
from evaluation.interpretability.sparse_probing_tasks import (
    SAE_PROBES,
    TaskSource,
    _columns_for,
    _hub_rows,
    _read_rows,
    check_sources,
    parse_sources,
)

__all__ = [
    "SAE_PROBES",
    "TaskSource",
    "_columns_for",
    "_hub_rows",
    "_read_rows",
    "check_sources",
    "parse_sources",
]
