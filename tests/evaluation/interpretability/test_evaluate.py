"""The evaluate entry point: runs per (version, eval), tags and links, idempotence, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import register_as_trained
from mlflow.tracking import MlflowClient

from evaluation.interpretability import evaluate as evaluate_module
from evaluation.interpretability import sparse_probing
from evaluation.interpretability.core import CoreConfig
from evaluation.interpretability.evaluate import EvaluationFailed, evaluate, main, summary_table
from evaluation.interpretability.sparse_probing import SparseProbingConfig
from project import runs as runs_module
from project.lm import lm_fingerprint, load_lm
from project.saes import SAEConfig, build_sae
from project.tracking import RUN_TYPE_TAG

NAME = "sae-tiny-l1"
LAYER = 1
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def labels_tsv(tmp_path_factory: pytest.TempPathFactory) -> str:
    lines = ["text\tlabel"] + [
        f"{'lovely great' if i % 2 else 'awful poor'} thing {i}\t{i % 2}" for i in range(60)
    ]
    path = tmp_path_factory.mktemp("labels") / "labels.tsv"
    path.write_text("\n".join(lines))
    return str(path)


def small_configs(labels_tsv: str) -> dict:
    return {
        "core": CoreConfig(context_size=16, n_tokens=150, n_ce_windows=4, batch_size=4),
        "sparse_probing": SparseProbingConfig(
            tasks=labels_tsv, n_train_per_class=20, n_test_per_class=10, max_tokens=12
        ),
    }


def register_versions(tiny_lm_dir: str, ks: tuple[int, ...] = (4, 8)) -> list[str]:
    """Register one random TopK SAE per k, as training would (tags included)."""
    uris = []
    for k in ks:
        torch.manual_seed(k)
        sae = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=128, k=k))
        version = register_as_trained(
            sae, registered_model=NAME, lm_name=tiny_lm_dir, layer=LAYER, target_l0=k
        )
        uris.append(f"models:/{NAME}/{version.version}")
    return uris


def eval_runs(filter_extra: str = "") -> list:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`{RUN_TYPE_TAG}` = 'eval'" + (f" AND {filter_extra}" if filter_extra else "")
    return client.search_runs(experiments, query)


def test_every_version_gets_one_linked_run_per_eval(
    tiny_lm_dir: str, labels_tsv: str, tracking_uri: str
) -> None:
    register_versions(tiny_lm_dir)
    results = evaluate(
        f"models:/{NAME}", ["core", "sparse_probing"], configs=small_configs(labels_tsv)
    )
    assert [(r.model_uri, r.eval_name) for r in results] == [
        (f"models:/{NAME}/1", "core"),
        (f"models:/{NAME}/1", "sparse_probing"),
        (f"models:/{NAME}/2", "core"),
        (f"models:/{NAME}/2", "sparse_probing"),
    ]
    assert all(r.ok and not r.reused for r in results)
    runs = eval_runs()
    assert len(runs) == 4
    client = MlflowClient()
    for run in runs:
        tags, eval_name = run.data.tags, run.data.tags["eval"]
        assert run.info.status == "FINISHED"
        assert tags["registered_model"] == NAME and tags["lm_name"] == tiny_lm_dir
        assert "model_name" not in tags  # one word, one meaning (project/tracking.py)
        version = client.get_model_version(NAME, tags["model_version"])
        assert tags["training_run_id"] == version.tags["training_run_id"] == version.run_id
        assert tags["architecture"] == "topk" and tags["d_sae"] == "128" and tags["layer"] == "1"
        assert tags["target_l0"] == version.tags["target_l0"]
        assert tags["eval_config_hash"]
        assert tags["saeflow.torch_threads"] == str(torch.get_num_threads())
        assert version.tags[f"eval.{eval_name}.run_id"] == run.info.run_id
        document = mlflow.artifacts.load_dict(
            f"runs:/{run.info.run_id}/{eval_name}_eval_results.json"
        )
        assert document["eval_type_id"] == eval_name
        assert document["saeflow_registry_uri"] == f"models:/{NAME}/{tags['model_version']}"
        assert document["sae_cfg_dict"]["d_sae"] == 128
        if eval_name == "core":
            assert run.data.params["n_tokens"] == "150"
            for metric in ("l0", "explained_variance", "mse", "cossim", "ce_loss_score"):
                assert metric in run.data.metrics
            for metric in ("kl_div_score", "frac_dead_latents", "freq_over_1_percent"):
                assert metric in run.data.metrics
            assert run.data.metrics["l0"] <= int(tags["target_l0"])
            assert set(document["eval_result_metrics"]) >= {
                "model_behavior_preservation",
                "model_performance_preservation",
                "reconstruction_quality",
                "shrinkage",
                "sparsity",
            }
        else:
            assert run.data.params["k_values"] == "1,2,5"
            for metric in ("llm_test_accuracy", "sae_test_accuracy", "sae_top_1_test_accuracy"):
                assert metric in run.data.metrics
            assert document["eval_result_details"][0]["dataset_name"] == "labels: 1 vs 0"

    # The printed summary: one line per version with its headline metrics.
    header, *rows = summary_table(results)
    assert header.split()[:4] == ["version", "SAE", "EV", "CE"]
    assert "probe top-1" in header and "autointerp" not in header
    assert [row.split()[0] for row in rows] == [f"models:/{NAME}/1", f"models:/{NAME}/2"]
    first = next(r for r in results if r.eval_name == "core")
    assert f"{first.metrics['explained_variance']:.3f}" in rows[0]


def test_same_config_reuses_the_finished_run_unless_forced(
    tiny_lm_dir: str, labels_tsv: str, tracking_uri: str
) -> None:
    (uri,) = register_versions(tiny_lm_dir, ks=(4,))
    configs = {"core": small_configs(labels_tsv)["core"]}
    (first,) = evaluate(uri, ["core"], configs=configs)
    (again,) = evaluate(uri, ["core"], configs=configs)
    assert again.reused and again.run_id == first.run_id
    assert again.metrics == pytest.approx(first.metrics)
    assert len(eval_runs()) == 1
    (forced,) = evaluate(uri, ["core"], force=True, configs=configs)
    assert not forced.reused and forced.run_id != first.run_id
    bigger = {"core": CoreConfig(context_size=16, n_tokens=200, n_ce_windows=4, batch_size=4)}
    (other,) = evaluate(uri, ["core"], configs=bigger)
    assert not other.reused
    assert len(eval_runs()) == 3
    # The version links the latest run.
    version = MlflowClient().get_model_version(NAME, "1")
    assert version.tags["eval.core.run_id"] == other.run_id


def test_an_alias_names_one_version(tiny_lm_dir: str, labels_tsv: str, tracking_uri: str) -> None:
    register_versions(tiny_lm_dir)
    MlflowClient().set_registered_model_alias(NAME, "best", "2")
    configs = {"core": small_configs(labels_tsv)["core"]}
    (result,) = evaluate(f"models:/{NAME}@best", ["core"], configs=configs)
    assert result.model_uri == f"models:/{NAME}/2"


@pytest.mark.parametrize(
    ("uri", "evals", "judge", "message"),
    [
        (f"models:/{NAME}/1", ["core", "bogus"], "offline", "bogus.*valid evals: core"),
        ("models:/no-such-model", ["core"], "offline", "models:/no-such-model"),
        (f"models:/{NAME}/99", ["core"], "offline", f"models:/{NAME}/99"),
        (f"models:/{NAME}@nope", ["core"], "offline", f"models:/{NAME}@nope"),
        ("runs:/abc/sae", ["core"], "offline", "runs:/abc/sae"),
        (f"models:/{NAME}/1", ["core", "autointerp"], "sorcerer", "sorcerer"),
    ],
)
def test_bad_input_fails_before_any_run(
    tiny_lm_dir: str, tracking_uri: str, uri: str, evals: list, judge: str, message: str
) -> None:
    register_versions(tiny_lm_dir, ks=(4,))
    with pytest.raises(ValueError, match=message):
        evaluate(uri, evals, judge)
    assert eval_runs() == []


def test_hf_judge_needs_a_named_model_and_takes_judge_options(
    tiny_lm_dir: str, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SAEFLOW_HF_JUDGE_MODEL", raising=False)
    register_versions(tiny_lm_dir, ks=(4,))
    # Never silently the evaluated LM as its own judge: no model named, no run.
    with pytest.raises(ValueError, match="model"):
        evaluate(f"models:/{NAME}/1", ["autointerp"], "hf")
    assert eval_runs() == []
    overrides = evaluate_module._overrides(["--judge.model", "some/judge", "--core.n_tokens=64"])
    assert overrides == {"judge": {"model": "some/judge"}, "core": {"n_tokens": "64"}}
    with pytest.raises(ValueError, match="unknown eval 'jduge'"):
        evaluate_module._overrides(["--jduge.model", "x"])


def test_unreachable_judge_endpoint_fails_before_any_run(
    tiny_lm_dir: str, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_versions(tiny_lm_dir, ks=(4,))
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    with pytest.raises(ValueError, match="127.0.0.1:9"):
        evaluate(f"models:/{NAME}/1", ["core", "autointerp"], "openai")
    assert eval_runs() == []


def test_a_failing_eval_fails_only_its_own_run(
    tiny_lm_dir: str, labels_tsv: str, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (uri,) = register_versions(tiny_lm_dir, ks=(4,))

    def broken(*args, **kwargs):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(sparse_probing, "compute", broken)
    with pytest.raises(EvaluationFailed, match="probe exploded") as failed:
        evaluate(uri, ["sparse_probing", "core"], configs=small_configs(labels_tsv))
    by_eval = {r.eval_name: r for r in failed.value.results}
    assert by_eval["core"].ok and not by_eval["sparse_probing"].ok
    client = MlflowClient()
    assert client.get_run(by_eval["sparse_probing"].run_id).info.status == "FAILED"
    assert client.get_run(by_eval["core"].run_id).info.status == "FINISHED"
    # The failed eval is retried next time; the finished one is reused.
    monkeypatch.undo()
    results = evaluate(uri, ["sparse_probing", "core"], configs=small_configs(labels_tsv))
    assert [(r.eval_name, r.reused) for r in results] == [
        ("sparse_probing", False),
        ("core", True),
    ]


def test_command_line_takes_config_overrides(
    tiny_lm_dir: str,
    tracking_uri: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    (uri,) = register_versions(tiny_lm_dir, ks=(4,))
    argv = [
        "evaluate",
        f"--model_uri={uri}",
        "--evals=core",
        "--judge=offline",
        "--force=false",
        "--core.n_tokens",
        "120",
        "--core.context_size=16",
        "--core.n_ce_windows=2",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    (run,) = eval_runs()
    assert run.data.params["n_tokens"] == "120" and run.data.params["context_size"] == "16"
    out = capsys.readouterr().out
    assert run.info.run_id in out and "browse:" in out

    monkeypatch.setattr(sys, "argv", [*argv[:5], "--core.no_such_field=1"])
    with pytest.raises(ValueError, match="no_such_field"):
        main()
    monkeypatch.setattr(sys, "argv", [*argv[:4], "--force=maybe"])
    with pytest.raises(SystemExit):
        main()


def test_registry_lists_every_eval() -> None:
    assert set(evaluate_module.EVALS) == {"core", "sparse_probing", "absorption", "autointerp"}
    config_cls, compute = evaluate_module.EVALS["core"].load()
    assert config_cls is CoreConfig and callable(compute)
    assert Path(evaluate_module.__file__).name == "evaluate.py"


def _mlflow_run(entry_point: str, params: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow_bin), "run", str(REPO), "-e", entry_point, "--env-manager", "local"]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)


def test_mlflow_run_random_control_then_all_four_evals(
    tiny_lm_dir: str, labels_tsv: str, tracking_uri: str, tmp_path: Path
) -> None:
    """The user path of the README: register a random-init control of a version with the
    import_sae entry point, then evaluate the registered model with all four evals."""
    (uri,) = register_versions(tiny_lm_dir, ks=(4,))
    imported = _mlflow_run("import_sae", {"source": f"random:{uri}"}, tmp_path)
    assert imported.returncode == 0, imported.stderr[-3000:]
    control = MlflowClient().get_model_version(NAME, "2")
    assert control.tags["baseline"] == "random_init" and control.tags["baseline_of"] == uri

    small = {
        "core.n_tokens": "150",
        "core.context_size": "16",
        "core.n_ce_windows": "4",
        "sparse_probing.tasks": labels_tsv,
        "sparse_probing.n_train_per_class": "20",
        "sparse_probing.n_test_per_class": "10",
        "absorption.max_tokens_per_letter": "24",
        "absorption.min_tokens_per_letter": "12",
        "absorption.max_k_value": "3",
        "autointerp.n_latents": "4",
        "autointerp.n_tokens": "4096",
        "autointerp.context_size": "64",
        "autointerp.min_firings": "8",
    }
    evals = "core,sparse_probing,absorption,autointerp"
    params = {"model_uri": f"models:/{NAME}", "evals": evals, "judge": "offline", **small}
    evaluated = _mlflow_run("evaluate", params, tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    client = MlflowClient()
    for version in ("1", "2"):
        tags = client.get_model_version(NAME, version).tags
        for name in evals.split(","):
            run = client.get_run(tags[f"eval.{name}.run_id"])
            assert run.info.status == "FINISHED" and run.data.tags["model_version"] == version
    lines = evaluated.stdout.splitlines()
    header = next(line for line in lines if line.startswith("version"))
    for title in ("EV", "CE score", "probe top-1", "absorption", "letter F1", "autointerp"):
        assert title in header
    control_row = next(line for line in lines if line.startswith(f"models:/{NAME}/2 "))
    assert "random_init" in control_row


class _Judge:
    """Stands in for a judge object: only its identity matters to the reuse hash."""

    name = "openai"

    def __init__(self, model: str, endpoint: str = "http://localhost:8000/v1") -> None:
        self.model, self.endpoint = model, endpoint

    def identity(self) -> dict[str, str]:
        return {"kind": self.name, "model": self.model, "endpoint": self.endpoint}


def test_reuse_hash_covers_judge_identity_lm_weights_and_code(
    tiny_lm_dir: str, labels_tsv: str, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (uri,) = register_versions(tiny_lm_dir, ks=(4,))
    mv = MlflowClient().get_model_version(NAME, "1")
    config = small_configs(labels_tsv)["core"]

    def digest(judge: object, lm: str = "lm:1", code: str = "0.1.0+src.a") -> str:
        return runs_module.config_hash(
            "autointerp", config, judge, mv, lm_fingerprint=lm, code_version=code
        )

    # Changing OPENAI_MODEL or the endpoint is another evaluation; the same judge is not.
    assert digest(_Judge("gpt-4o-mini")) == digest(_Judge("gpt-4o-mini"))
    assert digest(_Judge("gpt-4o-mini")) != digest(_Judge("gpt-4o"))
    assert digest(_Judge("m", "http://a/v1")) != digest(_Judge("m", "http://b/v1"))
    assert digest("offline") != digest("hf")  # a judge without identity(): its name
    assert digest(_Judge("m")) != digest(_Judge("m"), lm="lm:2")
    assert digest(_Judge("m")) != digest(_Judge("m"), code="0.1.0+src.b")

    # End to end: same LM and code reuse; new LM weights or a code change recompute.
    lm = load_lm(tiny_lm_dir)
    configs = {"core": config}
    (first,) = evaluate(uri, ["core"], configs=configs, lms={tiny_lm_dir: lm})
    run = MlflowClient().get_run(first.run_id)
    assert run.data.tags["lm_fingerprint"] == lm_fingerprint(lm)
    assert run.data.tags["saeflow_version"] == runs_module.saeflow_version()
    assert "+src." in run.data.tags["saeflow_version"]
    (again,) = evaluate(uri, ["core"], configs=configs, lms={tiny_lm_dir: lm})
    assert again.reused
    with torch.no_grad():
        lm.model.model.layers[0].mlp.down_proj.weight.mul_(1.01)  # "fine-tuned" weights
    (retuned,) = evaluate(uri, ["core"], configs=configs, lms={tiny_lm_dir: lm})
    assert not retuned.reused
    monkeypatch.setattr(runs_module, "saeflow_version", lambda: "0.1.0+src.fixed")
    (fixed,) = evaluate(uri, ["core"], configs=configs, lms={tiny_lm_dir: lm})
    assert not fixed.reused
    assert len(eval_runs()) == 3


def test_saeflow_version_hashes_the_eval_source() -> None:
    version = runs_module.saeflow_version()
    assert version.startswith("0.1.0+src.") and len(version.split("+src.")[1]) == 12


def test_summary_shows_intervals_and_the_autointerp_floor(
    tiny_lm_dir: str, tracking_uri: str
) -> None:
    uri_a, uri_b = register_versions(tiny_lm_dir)
    probing = {
        "sae_top_1_test_accuracy": 0.544,
        "sae_top_1_test_accuracy_ci_low": 0.512,
        "sae_top_1_test_accuracy_ci_high": 0.571,
    }
    autointerp = {
        "autointerp_score": 0.719,
        "autointerp_score_ci_low": 0.69,
        "autointerp_score_ci_high": 0.75,
        "constant_answer_score": 0.714,
        "autointerp_balanced_accuracy": 0.52,
    }
    results = [
        evaluate_module.EvalRunResult(uri_a, "sparse_probing", "FINISHED", "r1", probing),
        evaluate_module.EvalRunResult(uri_a, "autointerp", "FINISHED", "r2", autointerp),
        # An older run logged without intervals or floor: its cells show what there is.
        evaluate_module.EvalRunResult(
            uri_b, "autointerp", "FINISHED", "r3", {"autointerp_score": 0.656}
        ),
    ]
    header, row_a, row_b, note = summary_table(results)
    assert "probe top-1" in header and "floor" in header and "balanced acc" in header
    assert "0.544 [0.512, 0.571]" in row_a
    assert "0.719 [0.690, 0.750]" in row_a and "0.714" in row_a
    assert "0.656" in row_b and row_b.split()[-3:] == ["0.656", "-", "-"]
    assert "95% bootstrap interval" in note and "floor" in note
