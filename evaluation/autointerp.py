"""Temporary re-export: evaluation/probing/probe.py imports ``bootstrap_interval`` from here; it
lives in project/statistics.py. Autointerp is evaluation/interpretability/autointerp.py."""

# temporary: evaluation/probing imports this; removed when probing moves
from project.statistics import bootstrap_interval

__all__ = ["bootstrap_interval"]
