"""The probe entry point end to end on a tiny random LM: one run per (version, regime), linked
to the version, with tables, metrics and plots; reuse; bad input before any activation."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import register_as_trained
from mlflow.tracking import MlflowClient

from evaluation.probing_regimes import activations
from evaluation.probing_regimes.probe import main
from project.cli import EXIT_BAD_INPUT, run_entry_point
from project.saes import SAEConfig, build_sae
from project.tracking import LM_TAG, MODEL_URI_TAG, RUN_TYPE_TAG

NAME = "sae-tiny-probe"
LAYER = 1
SMALL = [
    "--train_sizes", "3,150",
    "--imbalance_ratios", "0.2",
    "--noise_fractions", "0,0.3",
    "--baselines", "logreg,knn",
    "--regime_ks", "4",
    "--max_train", "128",
    "--max_rows", "300",
    "--max_seq_len", "16",
]  # fmt: skip


@pytest.fixture(scope="module")
def labels_csv(tmp_path_factory: pytest.TempPathFactory) -> str:
    words = ("lovely great fine", "awful poor bad")
    lines = ["text,label"] + [
        f"{words[i % 2]} thing number {i},{('good', 'bad')[i % 2]}" for i in range(300)
    ]
    path = tmp_path_factory.mktemp("probe-data") / "reviews.csv"
    path.write_text("\n".join(lines))
    return str(path)


def register(tiny_lm_dir: str) -> str:
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=128, k=8))
    version = register_as_trained(
        sae, registered_model=NAME, lm_name=tiny_lm_dir, layer=LAYER, target_l0=8
    )
    return f"models:/{NAME}/{version.version}"


def _cache_files() -> set[Path]:
    return set(activations.cache_dir().glob("*")) if activations.cache_dir().is_dir() else set()


def test_probe_four_regimes_end_to_end(
    tracking_uri: str, tiny_lm_dir: str, labels_csv: str, capsys: pytest.CaptureFixture
) -> None:
    uri = register(tiny_lm_dir)
    datasets = f"5_hist_fig_ismale,{labels_csv}:text:label"
    main(["--model_uri", uri, "--datasets", datasets, *SMALL])
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{RUN_TYPE_TAG}` = 'probe'")
    by_regime = {r.data.tags["regime"]: r for r in runs}
    assert sorted(by_regime) == ["imbalance", "noise", "scarcity", "shift"]
    version = client.get_model_version(NAME, "1")
    for regime, run in by_regime.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags[MODEL_URI_TAG] == uri and run.data.tags[LM_TAG] == tiny_lm_dir
        assert version.tags[f"probe.{regime}.run_id"] == run.info.run_id
        m = run.data.metrics
        assert 0 <= m["auc_without_sae"] <= 1 and 0 <= m["share_sae_chosen"] <= 1
        assert m["delta_auc"] == pytest.approx(m["auc_with_sae"] - m["auc_without_sae"])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert f"plots/{regime}_with_vs_without.png" in artifacts
        tables = {a.path for a in client.list_artifacts(run.info.run_id, "tables")}
        assert tables == {"tables/methods.json", "tables/quiver.json"}
    # scarcity: 2 sizes x 2 datasets; shift: only the sae-probes dataset has a shifted set
    assert by_regime["scarcity"].data.metrics["n_cells"] == 4
    assert by_regime["shift"].data.metrics["n_cells"] == 1
    assert "plots/scarcity_auc.png" in {
        a.path for a in client.list_artifacts(by_regime["scarcity"].info.run_id, "plots")
    }
    # The planted words make the csv task easy for the baselines even on a random LM.
    quiver = mlflow.load_table("tables/quiver.json", run_ids=[by_regime["noise"].info.run_id])
    clean = quiver[(quiver["value"] == 0.0) & (quiver["dataset"] == "reviews")]
    assert float(clean["auc_without_sae"].iloc[0]) > 0.9
    # Activations were cached: the same call reuses every run and computes nothing.
    cached = _cache_files()
    assert len(cached) == 3  # two datasets and one shifted set
    capsys.readouterr()
    main(["--model_uri", uri, "--datasets", datasets, *SMALL])
    assert capsys.readouterr().out.count("reused") == 4
    assert len(client.search_runs(experiments, f"tags.`{RUN_TYPE_TAG}` = 'probe'")) == 4


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        (["text,label", "a,1", "b,1", "c,1"], [], "label column 'label' has one class"),
        (["text,kind", "a,1", "b,0"], [], "has no column 'label'"),
        (None, ["--train_sizes", "3,5000"], "train_sizes [5000] are larger than the data"),
    ],
)
def test_bad_input_fails_before_any_activation(
    tracking_uri: str,
    tiny_lm_dir: str,
    labels_csv: str,
    tmp_path: Path,
    rows: list[str] | None,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture,
) -> None:
    uri = register(tiny_lm_dir)
    source = labels_csv
    if rows is not None:
        path = tmp_path / "bad.csv"
        path.write_text("\n".join(rows))
        source = str(path)
    before = _cache_files()
    args = ["--model_uri", uri, "--datasets", f"{source}:text:label", *SMALL, *extra]
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(lambda: main(args))
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert np.any([message in line for line in capsys.readouterr().err.splitlines()]), message
    assert _cache_files() == before
