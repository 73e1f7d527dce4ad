"""Importing SAEs saeflow did not train: SAELens directories and releases, dictionary_learning.

References are computed by SAELens itself (for SAELens directories) or from dictionary_learning's
formulas written out here (for its checkpoints), never by saeflow's own code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import huggingface_hub
import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file
from torch import Tensor

from project import dictionary_learning
from project.import_sae import import_sae, residual_layer
from project.registry import VERSION_TAG_KEYS, load_sae
from project.tracking import RUN_TYPE_TAG

D_IN, D_SAE, K = 64, 256, 8
REPO = Path(__file__).resolve().parents[2]


def assert_nothing_logged() -> None:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == []
    assert client.search_registered_models() == []


# ---------------------------------------------------------------------------------------------
# SAELens-written directories


def saelens_sae(kind: str, d_in: int = D_IN, hook: str = "blocks.1.hook_resid_post") -> Any:
    """A SAELens TopK or JumpReLU SAE with random weights, built with SAELens' own classes."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    meta = SAEMetadata(model_name="tiny-random-llama", hook_name=hook)
    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=D_SAE, k=K, metadata=meta))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=D_SAE, metadata=meta))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in sae.state_dict().items():
            if name == "threshold":
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return sae.eval()


def assert_same_as_saelens(ours: torch.nn.Module, reference: Any, x_BD: Tensor) -> None:
    with torch.no_grad():
        f_ref = reference.encode(x_BD)
        f = ours.encode(x_BD)
        assert (f_ref != 0).any(), "the test input must make some latents fire"
        torch.testing.assert_close(f, f_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.decode(f_ref), reference.decode(f_ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["topk", "jumprelu"])
def test_saelens_directory_imports_like_a_trained_version(
    kind: str,
    tiny_lm_dir: str,
    tmp_path: Path,
    tracking_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sae_lens import SAE

    reference = saelens_sae(kind)
    source = tmp_path / "saelens"
    reference.save_model(source)

    version = import_sae(str(source), model=tiny_lm_dir)

    tags = version.tags
    assert set(VERSION_TAG_KEYS) <= set(tags)
    assert tags["architecture"] == kind and tags["source"] == str(source.resolve())
    assert tags["source_format"] == "sae_lens_dir" and tags["n_tokens"] == "0"
    assert tags["d_in"] == "64" and tags["d_sae"] == "256" and tags["layer"] == "1"
    assert tags["hook_name"] == "blocks.1.hook_resid_post"
    assert tags["lm_name"] == str(Path(tiny_lm_dir).resolve()) and "model_name" not in tags
    assert version.name == f"sae-{Path(tiny_lm_dir).name}-l1-resid-post"
    if kind == "topk":
        assert (tags["target_l0"], tags["target_l0_source"]) == ("8", "config")
    else:  # no k in the cfg: the L0 measured on the LM's activations
        assert tags["target_l0_source"] == "measured"
        assert 0 <= float(tags["target_l0"]) <= D_SAE
        assert float(tags["target_l0"]) == pytest.approx(float(tags["metric.l0"]), abs=0.05)
    run = MlflowClient().get_run(tags["training_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[RUN_TYPE_TAG] == "import"
    assert run.data.params["source"] == str(source) and run.data.params["layer"] == "1"
    assert run.data.params["model"] == tiny_lm_dir

    # It evaluates like any other version: loads without unpickling, in saeflow and SAELens.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    uri = f"models:/{version.name}/{version.version}"
    loaded = load_sae(uri)
    x_BD = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1))
    assert_same_as_saelens(loaded, reference, x_BD)
    assert_same_as_saelens(loaded, SAE.load_from_disk(source), x_BD)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    assert_same_as_saelens(loaded, SAE.load_from_disk(local / "artifacts" / "sae"), x_BD)
    predicted = mlflow.pyfunc.load_model(uri).predict(x_BD.numpy())
    np.testing.assert_allclose(predicted, reference.encode(x_BD).detach().numpy(), atol=1e-5)


def test_random_baseline_of_a_registered_version(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str
) -> None:
    source = tmp_path / "saelens"
    saelens_sae("topk").save_model(source)
    trained = import_sae(str(source), model=tiny_lm_dir)
    trained_uri = f"models:/{trained.name}/{trained.version}"

    control = import_sae(f"random:{trained_uri}")

    # Same registered model, site and config; fresh weights; tagged as the control it is.
    assert control.name == trained.name and int(control.version) == int(trained.version) + 1
    tags = control.tags
    assert tags["baseline"] == "random_init" and tags["baseline_of"] == trained_uri
    assert tags["source_format"] == "random_init" and tags["source"] == f"random:{trained_uri}"
    for key in ("architecture", "d_in", "d_sae", "layer", "hook_name", "lm_name", "target_l0"):
        assert tags[key] == trained.tags[key], key
    # Calibrated to the reference's sparsity (tests/project/test_random_control.py: each family).
    reference_l0 = float(tags["baseline_reference_l0"])
    assert float(tags["l0_measured"]) == pytest.approx(reference_l0, rel=0.1)
    assert tags["calibration"].startswith("k=")
    random_sae = load_sae(f"models:/{control.name}/{control.version}")
    trained_sae = load_sae(trained_uri)
    assert random_sae.cfg.k == trained_sae.cfg.k == 8
    assert not torch.allclose(random_sae.W_dec, trained_sae.W_dec)
    # Seeded: a second control has the same weights.
    again = import_sae(f"random:{trained_uri}")
    torch.testing.assert_close(
        load_sae(f"models:/{again.name}/{again.version}").W_dec, random_sae.W_dec
    )


def test_random_baseline_of_a_missing_version_fails_and_registers_nothing(
    tracking_uri: str,
) -> None:
    with pytest.raises(ValueError, match=r"random:models:/no-such-sae/1"):
        import_sae("random:models:/no-such-sae/1")
    with pytest.raises(ValueError, match=r"give a registered version, models:/NAME/VERSION"):
        import_sae("random:/some/dir")
    assert_nothing_logged()


def test_d_in_that_does_not_fit_the_lm_fails_and_registers_nothing(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str
) -> None:
    source = tmp_path / "wide"
    saelens_sae("topk", d_in=32).save_model(source)
    with pytest.raises(ValueError, match=r"SAE d_in 32 does not fit LM .* is 64"):
        import_sae(str(source), model=tiny_lm_dir)
    assert_nothing_logged()


def _nan_weight(path: Path) -> None:
    weights = load_file(path / "sae_weights.safetensors")
    weights["W_dec"][3, 5] = float("nan")
    save_file(weights, path / "sae_weights.safetensors")


def _drop_threshold(path: Path) -> None:
    weights = load_file(path / "sae_weights.safetensors")
    del weights["threshold"]
    save_file(weights, path / "sae_weights.safetensors")


@pytest.mark.parametrize(
    ("kind", "hook", "edit", "kwargs", "message"),
    [
        ("topk", "blocks.1.hook_resid_post", _nan_weight, {}, "'W_dec' has 1 non-finite"),
        ("jumprelu", "blocks.1.hook_resid_post", _drop_threshold, {}, "needs its 'threshold'"),
        ("topk", "blocks.1.hook_mlp_out", None, {}, "not a residual-stream hook"),
        ("topk", "blocks.1.hook_resid_post", None, {"layer": 2}, "layer=2 contradicts"),
        ("topk", "blocks.9.hook_resid_post", None, {}, "layer 9 is out of range"),
    ],
)
def test_bad_saelens_directory_fails_and_registers_nothing(
    kind: str,
    hook: str,
    edit: Any,
    kwargs: dict[str, Any],
    message: str,
    tiny_lm_dir: str,
    tmp_path: Path,
    tracking_uri: str,
) -> None:
    source = tmp_path / "bad"
    saelens_sae(kind, hook=hook).save_model(source)
    if edit is not None:
        edit(source)
    with pytest.raises(ValueError, match=message):
        import_sae(str(source), model=tiny_lm_dir, **kwargs)
    assert_nothing_logged()


def test_resid_pre_hook_is_the_previous_layers_resid_post(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str
) -> None:
    source = tmp_path / "pre"
    saelens_sae("topk", hook="blocks.2.hook_resid_pre").save_model(source)
    version = import_sae(str(source), model=tiny_lm_dir, registered_model="imported")
    assert version.name == "imported"
    assert version.tags["layer"] == "1" and version.tags["hook_name"] == "blocks.1.hook_resid_post"


@pytest.mark.parametrize(
    ("hook", "layer"),
    [
        ("blocks.3.hook_resid_post", 3),
        ("blocks.3.hook_resid_pre", 2),
        ("model.layers.3", 3),
        ("model.model.layers.3", 3),
        ("transformer.h.3", 3),
        ("gpt_neox.layers.3", 3),
    ],
)
def test_residual_layer_of_hook(hook: str, layer: int) -> None:
    assert residual_layer(hook) == layer


@pytest.mark.parametrize(
    "hook", ["blocks.0.hook_resid_pre", "blocks.3.hook_resid_mid", "blocks.3.attn.hook_z", "x"]
)
def test_non_residual_hooks_are_refused(hook: str) -> None:
    with pytest.raises(ValueError, match=hook.replace(".", r"\.")):
        residual_layer(hook)


# ---------------------------------------------------------------------------------------------
# SAELens releases


def test_sae_lens_release_without_network_fails_fast_naming_the_source(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    source = "sae_lens:gpt2-small-res-jb/blocks.0.hook_resid_pre"
    started = time.monotonic()
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE") as info:
        import_sae(source)
    assert source in str(info.value) and time.monotonic() - started < 60
    with pytest.raises(ValueError, match="no release 'gpt2-small-res-jbb'.*gpt2-small-res-jb"):
        import_sae("sae_lens:gpt2-small-res-jbb/blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="has no SAE 'blocks.99"):
        import_sae("sae_lens:gpt2-small-res-jb/blocks.99.hook_resid_pre")
    assert_nothing_logged()


def test_sae_lens_release_imports_what_sae_lens_loads(
    tiny_lm_dir: str, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release path with SAELens' download replaced by a local SAE (no network here)."""
    from sae_lens import SAE

    reference = saelens_sae("jumprelu")
    calls: list[tuple[Any, ...]] = []

    def fake_download(*args: Any, **kwargs: Any) -> tuple[Any, dict, None]:
        calls.append(args)
        return reference, {}, None

    monkeypatch.setattr(SAE, "from_pretrained_with_cfg_and_sparsity", fake_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no hub probe
    source = "sae_lens:gpt2-small-res-jb/blocks.0.hook_resid_pre"
    version = import_sae(source, model=tiny_lm_dir)
    assert calls == [("gpt2-small-res-jb", "blocks.0.hook_resid_pre")]
    tags = version.tags
    assert tags["source"] == source and tags["source_format"] == "sae_lens_release"
    assert tags["sae_lens_repo"] == "jbloom/GPT2-Small-SAEs-Reformatted/blocks.0.hook_resid_pre"
    assert tags["layer"] == "1"  # from the SAE's own cfg, not the release's id
    x_BD = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(3))
    assert_same_as_saelens(load_sae(f"models:/{version.name}/{version.version}"), reference, x_BD)


def test_an_unfaithful_conversion_is_refused() -> None:
    from project.import_sae import compare_with_saelens
    from project.saes import load_sae_dir

    reference = saelens_sae("topk")
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_model(tmp)
        ours = load_sae_dir(tmp)
    x_BD = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(4))
    compare_with_saelens(ours, reference, x_BD, "src")
    with torch.no_grad():
        ours.b_enc += 0.5
    with pytest.raises(ValueError, match="src: saeflow's encode differs from SAELens'"):
        compare_with_saelens(ours, reference, x_BD, "src")


# ---------------------------------------------------------------------------------------------
# dictionary_learning checkpoints: real format written by hand, references from its formulas


def dl_checkpoint(dict_class: str, seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A state_dict as dictionary_learning's ``dict_class`` saves it, and its config.json."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.1) -> Tensor:
        return torch.randn(*shape, generator=gen) * scale

    D, F = D_IN, D_SAE
    trainer: dict[str, Any] = {
        "dict_class": dict_class,
        "activation_dim": D,
        "dict_size": F,
        "layer": 1,
        "lm_name": "tiny-random-llama",
        "submodule_name": "resid_post_layer_1",
        "lr": 3e-4,
        "steps": 1000,
        "seed": 0,
        "device": "cpu",
    }
    if dict_class == "AutoEncoder":
        # Decoder columns deliberately not unit norm (the April-update recipe leaves them free).
        state = {
            "bias": rand(D),
            "encoder.weight": rand(F, D),
            "encoder.bias": rand(F),
            "decoder.weight": rand(D, F, scale=0.3),
        }
        trainer["trainer_class"] = "StandardTrainerAprilUpdate"
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        threshold = -1.0 if dict_class == "AutoEncoderTopK" else 0.05
        state = {
            "k": torch.tensor(K, dtype=torch.int),
            "threshold": torch.tensor(threshold),
            "decoder.weight": rand(D, F),
            "encoder.weight": rand(F, D),
            "encoder.bias": rand(F),
            "b_dec": rand(D),
        }
        trainer.update(k=K, trainer_class="TopKTrainer" if "TopK" in dict_class else "BatchTopK")
    elif dict_class == "MatryoshkaBatchTopKSAE":
        state = {
            "k": torch.tensor(K, dtype=torch.int),
            "threshold": torch.tensor(0.05),
            "group_sizes": torch.tensor([32, 64, 160]),
            "W_enc": rand(D, F),
            "b_enc": rand(F),
            "W_dec": rand(F, D),
            "b_dec": rand(D),
        }
        trainer.update(k=K, trainer_class="MatryoshkaBatchTopKTrainer", group_sizes=[32, 64, 160])
    elif dict_class == "JumpReluAutoEncoder":
        state = {
            "W_enc": rand(D, F),
            "b_enc": rand(F),
            "W_dec": rand(F, D),
            "b_dec": rand(D),
            "threshold": torch.rand(F, generator=gen) * 0.1,
        }
        trainer["trainer_class"] = "JumpReluTrainer"
    elif dict_class == "GatedAutoEncoder":
        state = {
            "decoder_bias": rand(D),
            "r_mag": rand(F),
            "gate_bias": rand(F),
            "mag_bias": rand(F),
            "encoder.weight": rand(F, D),
            "decoder.weight": rand(D, F),
        }
        trainer["trainer_class"] = "GatedSAETrainer"
    else:
        raise AssertionError(dict_class)
    buffer = {"d_submodule": D, "io": "out", "n_ctxs": 3000, "ctx_len": 128}
    return state, {"trainer": trainer, "buffer": buffer}


def write_dl(path: Path, state: dict[str, Tensor], config: dict[str, Any]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "ae.pt")
    (path / "config.json").write_text(json.dumps(config, indent=4))
    return path


def dl_reference(dict_class: str, s: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(features, reconstruction) by dictionary_learning's formulas (inference mode)."""
    relu = torch.relu
    if dict_class == "AutoEncoder":
        f = relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
        return f, f @ s["decoder.weight"].T + s["bias"]
    if dict_class == "AutoEncoderTopK":
        post = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        top = post.topk(int(s["k"]), dim=-1)
        f = torch.zeros_like(post).scatter_(-1, top.indices, top.values)
        return f, f @ s["decoder.weight"].T + s["b_dec"]
    if dict_class == "BatchTopKSAE":
        post = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        f = post * (post > s["threshold"])
        return f, f @ s["decoder.weight"].T + s["b_dec"]
    if dict_class == "MatryoshkaBatchTopKSAE":
        post = relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        f = post * (post > s["threshold"])
        return f, f @ s["W_dec"] + s["b_dec"]
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ s["W_enc"] + s["b_enc"]
        f = relu(pre * (pre > s["threshold"]))
        return f, f @ s["W_dec"] + s["b_dec"]
    if dict_class == "GatedAutoEncoder":
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        gate = (x_enc + s["gate_bias"] > 0).float()
        f = gate * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
        return f, f @ s["decoder.weight"].T + s["decoder_bias"]
    raise AssertionError(dict_class)


DL_CLASSES = {
    "AutoEncoder": "relu",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "batchtopk",
    "MatryoshkaBatchTopKSAE": "matryoshka",
    "JumpReluAutoEncoder": "jumprelu",
    "GatedAutoEncoder": "gated",
}


@pytest.mark.parametrize("dict_class", sorted(DL_CLASSES))
def test_dictionary_learning_conversion_matches_its_formulas(
    dict_class: str, tmp_path: Path
) -> None:
    state, config = dl_checkpoint(dict_class)
    checkpoint = dictionary_learning.load_checkpoint(write_dl(tmp_path / "ckpt", state, config))
    sae = checkpoint.sae
    assert sae.cfg.architecture == DL_CLASSES[dict_class]
    assert checkpoint.hook_name == "blocks.1.hook_resid_post"
    assert checkpoint.lm_name == "tiny-random-llama"
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1))
    f_ref, x_hat_ref = dl_reference(dict_class, state, x)
    assert (f_ref != 0).any()
    with torch.no_grad():
        f = sae.encode(x)
        torch.testing.assert_close(sae.decode(f), x_hat_ref, atol=1e-5, rtol=0)
        if dict_class == "AutoEncoder":
            # Folded decoder norms (as AutoEncoder.from_pretrained does): f in unit-decoder units.
            norm_F = state["decoder.weight"].norm(dim=0)
            torch.testing.assert_close(f, f_ref * norm_F, atol=1e-5, rtol=0)
            torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
        else:
            torch.testing.assert_close(f, f_ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(sae.decode(f_ref), x_hat_ref, atol=1e-5, rtol=0)
    if dict_class == "MatryoshkaBatchTopKSAE":
        assert sae.cfg.matryoshka_prefixes == [32, 96, 256]


def test_dictionary_learning_checkpoint_imports(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, config = dl_checkpoint("BatchTopKSAE")
    config["trainer"]["lm_name"] = tiny_lm_dir  # no model argument: the LM the config names
    source = write_dl(tmp_path / "trainer_0", state, config)
    version = import_sae(str(source))
    tags = version.tags
    assert tags["lm_name"] == str(Path(tiny_lm_dir).resolve()) and "model_name" not in tags
    assert set(VERSION_TAG_KEYS) <= set(tags)
    assert tags["architecture"] == "batchtopk" and tags["source_format"] == "dictionary_learning"
    assert (tags["target_l0"], tags["target_l0_source"]) == ("8", "config")
    assert tags["layer"] == "1" and tags["n_tokens"] == "0"
    assert tags["dictionary_learning_class"] == "BatchTopKSAE"

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    loaded = load_sae(f"models:/{version.name}/{version.version}")
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(2))
    f_ref, x_hat_ref = dl_reference("BatchTopKSAE", state, x)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), f_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.decode(f_ref), x_hat_ref, atol=1e-5, rtol=0)


def _with_nan(state: dict[str, Tensor], config: dict[str, Any]) -> None:
    state["encoder.weight"][0, 0] = float("nan")


def _without_threshold(state: dict[str, Tensor], config: dict[str, Any]) -> None:
    del state["threshold"]


def _unset_threshold(state: dict[str, Tensor], config: dict[str, Any]) -> None:
    state["threshold"] = torch.tensor(-1.0)


def _unknown_class(state: dict[str, Tensor], config: dict[str, Any]) -> None:
    config["trainer"]["dict_class"] = "CrossCoder"


def _mlp_submodule(state: dict[str, Tensor], config: dict[str, Any]) -> None:
    config["trainer"]["submodule_name"] = "mlp_out_layer_1"


@pytest.mark.parametrize(
    ("dict_class", "edit", "message"),
    [
        ("AutoEncoderTopK", _with_nan, "'encoder.weight' has 1 non-finite"),
        ("JumpReluAutoEncoder", _without_threshold, "no 'threshold' tensor"),
        ("BatchTopKSAE", _unset_threshold, "never set"),
        ("AutoEncoderTopK", _unknown_class, "'CrossCoder' is not supported"),
        ("AutoEncoderTopK", _mlp_submodule, "'mlp_out_layer_1' is not a residual-stream hook"),
    ],
)
def test_bad_dictionary_learning_checkpoint_fails_and_registers_nothing(
    dict_class: str, edit: Any, message: str, tiny_lm_dir: str, tmp_path: Path, tracking_uri: str
) -> None:
    state, config = dl_checkpoint(dict_class)
    edit(state, config)
    source = write_dl(tmp_path / "bad", state, config)
    with pytest.raises(ValueError, match=message):
        import_sae(str(source), model=tiny_lm_dir)
    assert_nothing_logged()


def test_a_pickled_module_is_refused(tmp_path: Path) -> None:
    state, config = dl_checkpoint("AutoEncoderTopK")
    source = write_dl(tmp_path / "pickled", state, config)
    torch.save(torch.nn.Linear(2, 2), source / "ae.pt")  # a whole module, not a state_dict
    with pytest.raises(ValueError, match="weights_only"):
        dictionary_learning.load_checkpoint(source)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_exits_2_on_bad_input(tiny_lm_dir: str, tmp_path: Path, tracking_uri: str) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    missing = tmp_path / "no-such-sae"
    result = subprocess.run(
        [sys.executable, "-m", "project.import_sae", "--source", str(missing)]
        + ["--model", tiny_lm_dir],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert str(missing) in result.stderr and "neither an existing directory" in result.stderr
    assert_nothing_logged()
