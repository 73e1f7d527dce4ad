"""Feature selection for steering (METHODS.md §4): per-latent scores (input score, output
score, Delta Token Confidence in both interventions, supervised calibrated F1), the rules that
turn scores into selected sets, the per-version scores table, and plots."""
