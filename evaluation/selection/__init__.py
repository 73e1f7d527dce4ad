"""Feature selection for steering (METHODS.md §4): the per-latent statistics table
(latent_stats.py: max activation and firing frequency), per-latent scores (input score, output
score, Delta Token Confidence in both interventions, supervised calibrated F1), the rules that
turn scores into selected sets, the criteria and the selection registry steering draws from
(criteria.py, registry.py), the per-version scores table (the ``selection_table`` entry point)
and plots. Selection feeds steering; nothing here imports evaluation.steering."""
