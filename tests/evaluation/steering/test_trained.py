"""Trained steering baselines (evaluation/steering/trained/): LoRA and LoReFT learn on a toy
concept, leave the shared LM as it was, and steer per row exactly as peft (LoRA) and as no
intervention at all (a zero edit) would, one batch mixing adapters."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import evaluation.steering.trained.train as train_module
from evaluation.steering.trained import (
    IGNORE,
    LOREFT_FIRST,
    TrainedAdapter,
    TrainedConfig,
    check_layers,
    default_layers,
    generate_token_ids_with_adapters,
    load_adapter,
    lora_peft_model,
    prompt_positions,
    response_loss,
    response_token_loss,
    save_adapter,
    tokenize_pair,
    train_lora,
    train_loreft,
    trainable_parameters,
)
from evaluation.steering.trained.data import collate
from project.generation import GenerationConfig, generate_token_ids, prompt_token_ids
from project.lm import LoadedLM, load_lm

# A toy concept: whatever the instruction, the response repeats one word.
PAIRS = [
    ("Tell me about the weather today.", "banana banana banana banana banana banana"),
    ("What is the capital of France?", "banana banana banana banana banana banana"),
    ("Write a haiku about autumn leaves, please.", "banana banana banana banana banana banana"),
    ("How do I sort a list in Python?", "banana banana banana banana banana banana"),
]
PROMPTS = [
    "Write a poem about the sea.",
    "Hi",
    "Explain recursion in Python with a short example, please.",
    "What is 2 + 2?",
]
GREEDY = GenerationConfig(max_new_tokens=8, temperature=0.0)
TOY = {"epochs": 6, "batch_size": 2, "lr": 2e-2, "max_response_tokens": 16, "seed": 0}


@pytest.fixture(scope="module")
def lm(tiny_lm_dir: str) -> LoadedLM:
    """The tiny Llama, loaded for this module alone (training must leave it as it was)."""
    return load_lm(tiny_lm_dir)


@pytest.fixture(scope="module")
def trained(lm: LoadedLM) -> dict[str, object]:
    """One LoRA and one LoReFT trained on the toy concept, and the LM's state before."""
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    flags = [p.requires_grad for p in lm.model.parameters()]
    lora = train_lora(lm, PAIRS, TrainedConfig(method="lora", **TOY))
    loreft = train_loreft(lm, PAIRS, TrainedConfig(method="loreft", **TOY))
    return {"lora": lora, "loreft": loreft, "state": state, "flags": flags}


def _falls(adapter: TrainedAdapter) -> None:
    steps_per_epoch = len(PAIRS) // TOY["batch_size"]
    last_epoch = sum(adapter.losses[-steps_per_epoch:]) / steps_per_epoch
    assert last_epoch < adapter.losses[0] - 0.5, adapter.losses


def test_default_layers_scale_axbenchs() -> None:
    assert default_layers(26) == (5, 10, 15, 20)  # AxBench's on Gemma-2-2B
    assert default_layers(30) == (6, 12, 17, 23)  # SmolLM2
    assert default_layers(4) == (1, 2, 3)
    assert default_layers(1) == (0,)
    assert check_layers(TrainedConfig(), 30) == (6, 12, 17, 23)
    assert check_layers(TrainedConfig(layers=(9, 2)), 30) == (2, 9)


def test_labels_mask_the_prompt(lm: LoadedLM) -> None:
    instruction, response = PAIRS[0]
    example = tokenize_pair(lm, instruction, response, max_response_tokens=64)
    prompt = prompt_token_ids(lm, instruction)  # what generation prompts with
    n = len(prompt)
    assert example.prompt_length == n
    assert list(example.input_ids[:n]) == prompt
    assert list(example.labels[:n]) == [IGNORE] * n
    assert example.labels[n:] == example.input_ids[n:]
    assert example.input_ids[-1] == lm.tokenizer.eos_token_id
    assert lm.tokenizer.decode(example.input_ids[n:-1]) == response
    cut = tokenize_pair(lm, instruction, response, max_response_tokens=3)
    assert len(cut.input_ids) == n + 3 and cut.input_ids[-1] != lm.tokenizer.eos_token_id


def test_loss_ignores_the_prompt_positions(lm: LoadedLM) -> None:
    examples = [tokenize_pair(lm, i, r, 16) for i, r in PAIRS[:2]]
    batch = collate(examples, pad_id=0)
    generator = torch.Generator().manual_seed(0)
    logits_BTV = torch.randn(*batch.input_BT.shape, 50, generator=generator)
    labels_BT = batch.labels_BT.clamp(max=49)  # a 50-token toy vocabulary
    loss = response_token_loss(logits_BTV, labels_BT)
    # By hand: the logits at column t predict the label at t + 1, response labels only.
    picked = [
        torch.log_softmax(logits_BTV[b, t - 1], -1)[labels_BT[b, t]]
        for b in range(2)
        for t in range(1, labels_BT.shape[1])
        if labels_BT[b, t] != IGNORE
    ]
    assert torch.allclose(loss, -torch.stack(picked).mean())
    # The logits at prompt columns before the last predict prompt tokens: nothing counts them.
    n = examples[0].prompt_length
    moved = logits_BTV.clone()
    moved[0, : n - 1] = torch.randn(n - 1, 50, generator=generator)
    assert torch.equal(response_token_loss(moved, labels_BT), loss)
    # The last prompt column predicts the first response token: that one counts.
    moved[0, n - 1] += torch.randn(50, generator=generator)
    assert not torch.equal(response_token_loss(moved, labels_BT), loss)


def test_training_lowers_the_loss_and_leaves_the_lm_alone(
    lm: LoadedLM, trained: dict[str, object]
) -> None:
    lora, loreft = trained["lora"], trained["loreft"]
    assert isinstance(lora, TrainedAdapter) and isinstance(loreft, TrainedAdapter)
    _falls(lora)
    _falls(loreft)
    # ... and on the pairs through the per-row hooks, in eval mode.
    plain = response_loss(lm, PAIRS, None, max_response_tokens=16)
    assert response_loss(lm, PAIRS, lora, max_response_tokens=16) < plain - 0.5
    assert response_loss(lm, PAIRS, loreft, max_response_tokens=16) < plain - 0.5
    # The shared LM: the same weights bit for bit, flags, mode and class; no peft left on it.
    state = trained["state"]
    assert isinstance(state, dict)
    after = lm.model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert [p.requires_grad for p in lm.model.parameters()] == trained["flags"]
    assert not lm.model.training and type(lm.model).__name__ == "LlamaForCausalLM"
    assert not hasattr(lm.model, "peft_config")
    assert not any("lora" in name for name, _ in lm.model.named_modules())
    # What was trained: default layers, rank 4, sizes as counted beforehand.
    assert lora.layers == loreft.layers == (1, 2, 3)
    assert lora.n_parameters == trainable_parameters(lora.config, lm) == 3 * 4 * (64 + 64)
    assert loreft.n_parameters == trainable_parameters(loreft.config, lm) == 3 * (2 * 4 * 64 + 4)
    assert lora.scaling == 32.0 / 4**0.5  # rsLoRA
    R = loreft.loreft(1)[0]
    assert torch.allclose(R @ R.T, torch.eye(4), atol=1e-5)  # orthonormal rows


def test_zero_edits_generate_as_the_plain_lm(lm: LoadedLM, trained: dict[str, object]) -> None:
    lora, loreft = trained["lora"], trained["loreft"]
    assert isinstance(lora, TrainedAdapter) and isinstance(loreft, TrainedAdapter)
    plain = generate_token_ids(lm, PROMPTS, GREEDY)
    # LoRA with B = 0 (peft's initialisation).
    zero_B = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in lora.tensors.items()}
    lora_zero = replace(lora, tensors=zero_B)
    # LoReFT with W = R and b = 0: Wh + b − Rh = 0.
    no_edit = {k: v for k, v in loreft.tensors.items() if not k.endswith((".W", ".b"))}
    for layer in loreft.layers:
        no_edit[f"layers.{layer}.W"] = loreft.tensors[f"layers.{layer}.R"]
        no_edit[f"layers.{layer}.b"] = torch.zeros(4)
    loreft_zero = replace(loreft, tensors=no_edit)
    for adapter in (lora_zero, loreft_zero):
        steered = generate_token_ids_with_adapters(lm, PROMPTS, [adapter] * len(PROMPTS), GREEDY)
        assert steered == plain
    # The trained ones do steer (so the comparisons below are not vacuous).
    for adapter in (lora, loreft):
        steered = generate_token_ids_with_adapters(lm, PROMPTS, [adapter] * len(PROMPTS), GREEDY)
        assert steered != plain


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_lora_hooks_generate_as_peft(
    lm: LoadedLM, trained: dict[str, object], temperature: float
) -> None:
    lora = trained["lora"]
    assert isinstance(lora, TrainedAdapter)
    peft_lm = LoadedLM(
        model=lora_peft_model(lm, lora),
        tokenizer=lm.tokenizer,
        name=lm.name,
        n_layers=lm.n_layers,
        d_model=lm.d_model,
    )
    config = replace(GREEDY, temperature=temperature)
    seeds = [11, 12, 13, 14]
    by_peft = generate_token_ids(peft_lm, PROMPTS, config, seeds=seeds)
    by_hooks = generate_token_ids_with_adapters(
        lm, PROMPTS, [lora] * len(PROMPTS), config, seeds=seeds
    )
    assert by_hooks == by_peft
    # The same numbers, not only the same argmax: the response loss of both paths.
    examples = [tokenize_pair(lm, i, r, 16) for i, r in PAIRS]
    batch = collate(examples, pad_id=0)
    with torch.no_grad():
        logits_BTV = peft_lm.model(
            input_ids=batch.input_BT, attention_mask=batch.mask_BT, use_cache=False
        ).logits
    peft_loss = float(response_token_loss(logits_BTV, batch.labels_BT))
    assert response_loss(lm, PAIRS, lora, max_response_tokens=16) == pytest.approx(
        peft_loss, rel=1e-5
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_mixed_batch_steers_each_row_as_alone(
    lm: LoadedLM, trained: dict[str, object], temperature: float
) -> None:
    lora, loreft = trained["lora"], trained["loreft"]
    assert isinstance(lora, TrainedAdapter) and isinstance(loreft, TrainedAdapter)
    # Prompt 2 is the longest: the steered rows are left-padded in the batch, not alone.
    adapters = [lora, loreft, None, loreft]
    config = replace(GREEDY, temperature=temperature, batch_size=8)
    seeds = [5, 6, 7, 8]
    mixed = generate_token_ids_with_adapters(lm, PROMPTS, adapters, config, seeds=seeds)
    alone = [
        generate_token_ids_with_adapters(lm, [p], [a], config, seeds=[s])[0]
        for p, a, s in zip(PROMPTS, adapters, seeds, strict=True)
    ]
    assert mixed == alone
    assert mixed[2] == generate_token_ids(lm, PROMPTS[2:3], config, seeds=seeds[2:3])[0]
    # Recomputing the whole sequence each step (no KV cache) edits the prompt in every pass and
    # nothing else: the same tokens as LoReFT in the prefill only.
    uncached = generate_token_ids_with_adapters(
        lm, PROMPTS, adapters, replace(config, use_cache=False), seeds=seeds
    )
    assert uncached == mixed


def test_loreft_positions_are_the_prompts_first_and_last_five() -> None:
    # Row 0: a 12-token prompt left-padded by 3 in a width of 15; row 1: a 7-token prompt.
    at_BW = prompt_positions(torch.tensor([3, 8]), torch.tensor([15, 15]), 15)
    assert at_BW[0].nonzero().flatten().tolist() == [3, 4, 5, 6, 7, 10, 11, 12, 13, 14]
    assert at_BW[1].nonzero().flatten().tolist() == list(range(8, 15))  # short: all of it
    assert LOREFT_FIRST == 5


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("method", "dora", "method='dora'"),
        ("rank", 0, "rank=0"),
        ("lora_dropout", 1.0, "lora_dropout=1.0"),
        ("lr", 0.0, "lr=0.0"),
        ("epochs", 0, "epochs=0"),
        ("layers", (1, 1), "twice"),
        ("layers", (-1,), "layers"),
    ],
)
def test_bad_config(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainedConfig(**{field: value})


def test_bad_inputs_fail_before_training(lm: LoadedLM, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr(train_module, "_fit", no_training)
    for train, method in ((train_lora, "lora"), (train_loreft, "loreft")):
        with pytest.raises(ValueError, match=r"layer 7 is out of range.*0\.\.3"):
            train(lm, PAIRS, TrainedConfig(method=method, layers=(1, 7)))
        with pytest.raises(ValueError, match="pairs is empty"):
            train(lm, [], TrainedConfig(method=method))
        with pytest.raises(ValueError, match=r"pairs\[1\]"):
            train(lm, [PAIRS[0], ("only an instruction",)], TrainedConfig(method=method))
    with pytest.raises(ValueError, match="method='loreft'"):
        train_lora(lm, PAIRS, TrainedConfig(method="loreft"))


def test_save_load_round_trip(trained: dict[str, object], tmp_path: Path) -> None:
    for name in ("lora", "loreft"):
        adapter = trained[name]
        assert isinstance(adapter, TrainedAdapter)
        loaded = load_adapter(save_adapter(adapter, tmp_path / name))
        assert loaded.config == adapter.config
        assert loaded.tensors.keys() == adapter.tensors.keys()
        assert all(torch.equal(loaded.tensors[k], v) for k, v in adapter.tensors.items())
        for attribute in (
            "d_model",
            "scaling",
            "target",
            "lm_name",
            "losses",
            "n_tokens",
            "seconds",
        ):
            assert getattr(loaded, attribute) == getattr(adapter, attribute)
    with pytest.raises(ValueError, match="no saved adapter"):
        load_adapter(tmp_path / "nothing")
