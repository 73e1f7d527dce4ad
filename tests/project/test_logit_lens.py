"""The logit lens equals the LM's own logits on its last residual stream, for every family."""

from __future__ import annotations

import pytest
import torch

from project.lm import TINY_FAMILIES, LoadedLM, build_tiny_random_lm, residual_activations
from project.logit_lens import decoder_lens_tokens, final_norm, logit_lens, top_tokens


def _tiny_gemma3(tokenizer) -> LoadedLM:  # noqa: ANN001 - a tokenizer
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        final_logit_softcapping=30.0,  # exercised here: Gemma3 ships without it
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LoadedLM(model, tokenizer, "tiny-random-gemma3", 2, 64)


@pytest.fixture(scope="module", params=[*TINY_FAMILIES, "gemma3"])
def family_lm(request: pytest.FixtureRequest, tiny_lm: LoadedLM) -> LoadedLM:
    if request.param == "gemma3":
        return _tiny_gemma3(tiny_lm.tokenizer)
    return build_tiny_random_lm(request.param, n_layers=2, tokenizer=tiny_lm.tokenizer)


def test_logit_lens_of_last_residual_is_the_lm_output(family_lm: LoadedLM) -> None:
    lm = family_lm
    ids = lm.tokenizer("From my experience, the lens reads", return_tensors="pt").input_ids
    resid_TD = residual_activations(lm, ids, lm.n_layers - 1)[0]
    with torch.inference_mode():
        expected_TV = lm.model(input_ids=ids).logits[0].float()
    got_TV = logit_lens(lm, resid_TD)
    assert got_TV.shape == expected_TV.shape
    torch.testing.assert_close(got_TV, expected_TV, atol=1e-4, rtol=1e-4)
    # The final norm actually matters: the raw unembedding of the residual differs.
    raw_TV = lm.model.get_output_embeddings()(resid_TD).float()
    assert (raw_TV - expected_TV).abs().max() > 1e-3
    assert final_norm(lm) is not None


def test_top_tokens_are_sorted_and_decoder_rows_are_normalised(tiny_lm: LoadedLM) -> None:
    torch.manual_seed(0)
    rows = torch.randn(5, tiny_lm.d_model)
    ids = top_tokens(tiny_lm, rows, k=20)
    logits = logit_lens(tiny_lm, rows)
    assert ids.shape == (5, 20)
    picked = logits.gather(1, ids)
    assert bool((picked[:, :-1] >= picked[:, 1:]).all())
    assert torch.equal(ids[:, 0], logits.argmax(dim=-1))
    # Row length does not change what a row promotes by more than the norm's epsilon.
    assert torch.equal(decoder_lens_tokens(tiny_lm, rows * 7.0), decoder_lens_tokens(tiny_lm, rows))


def test_bad_shapes_and_k(tiny_lm: LoadedLM) -> None:
    with pytest.raises(ValueError, match=r"shape \[N, 64\]"):
        logit_lens(tiny_lm, torch.zeros(3, 65))
    with pytest.raises(ValueError, match="k=0"):
        top_tokens(tiny_lm, torch.zeros(1, 64), k=0)
