"""Sparse probing in four regimes (Kantamneni et al.): data scarcity, class imbalance, label
noise and covariate shift; baselines against SAE probes, compared through the quiver of
arrows. Entry point: evaluation/probing_regimes/probe.py (``mlflow run . -e probe``)."""
