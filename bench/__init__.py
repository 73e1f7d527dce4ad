"""saeflow's benchmarks: `python -m bench` runs them all into one table (bench/__main__.py)."""
