"""SAEBench-style interpretability evaluations: core (reconstruction and downstream loss),
k-sparse probing (sparse_probing.py over the tasks of sparse_probing_tasks.py), feature
absorption and autointerp; each a typed config and ``compute(sae, lm, layer, config, ...) ->
EvalOutput`` (schema.py). Entry point: evaluation/interpretability/evaluate.py (``mlflow run .
-e evaluate``)."""
