"""Command-line helpers shared by the entry points (project/cli.py)."""

from __future__ import annotations

import pytest

from project.cli import parse_int, parse_list, parse_prefixed_options


def test_parse_list_casts_each_part_and_names_the_bad_one() -> None:
    assert parse_list("1, 2,,4.0", parse_int, "top_k", "integer") == (1, 2, 4)
    assert parse_list("0.5,2", float, "factors", "number") == (0.5, 2.0)
    with pytest.raises(ValueError, match="top_k: '2.5' in '1,2.5' is not an integer"):
        parse_list("1,2.5", parse_int, "top_k", "integer")


def test_parse_prefixed_options() -> None:
    extra = ["--judge.model", "gpt-4o-mini", "--judge.temperature=0.7"]
    assert parse_prefixed_options(extra) == {"model": "gpt-4o-mini", "temperature": "0.7"}
    with pytest.raises(ValueError, match="needs a value"):
        parse_prefixed_options(["--judge.model"])
    with pytest.raises(ValueError, match="unexpected argument '--n_trials'"):
        parse_prefixed_options(["--n_trials", "3"])
