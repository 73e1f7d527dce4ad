"""The probing paper's datasets, read from the installed sae-probes package's files."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from project import sae_probes


def test_the_113_binary_datasets_are_listed_and_load() -> None:
    names = sae_probes.dataset_names()
    assert len(names) == 113 and names[0] == "5_hist_fig_ismale"
    assert {"96_spam_is", "92_glue_sst2", "163_agnews_2"} <= set(names)
    texts, labels = sae_probes.load_dataset("92_glue_sst2")
    assert len(texts) == len(labels) == 5000
    assert labels.dtype == np.int64 and set(labels.tolist()) == {0, 1}
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert "sae_probes" not in sys.modules  # read as files, never imported


def test_bare_tags_ood_sets_and_string_labels() -> None:
    assert sae_probes.resolve_name("spam_is") == "96_spam_is"
    assert "87_glue_cola_OOD" in sae_probes.ood_dataset_names()
    texts, labels = sae_probes.load_dataset("66_living-room_OOD")  # targets are strings
    assert len(texts) == 300 and sorted(set(labels.tolist())) == [0, 1]


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"no dataset 'sst2'; did you mean 92_glue_sst2.*113"):
        sae_probes.load_dataset("sst2")
    with pytest.raises(ValueError, match="valid names include 5_hist_fig_ismale"):
        sae_probes.load_dataset("no_such_set")
