"""The one generation API: batching, KV cache, seeding and interventions on a tiny random LM."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch._dynamo.utils
from torch import Tensor

from project.generation import (
    AddVectors,
    GenerationConfig,
    compiled_forward,
    generate,
    generate_added,
    generate_token_ids,
    prompt_token_ids,
)
from project.lm import LoadedLM, build_tiny_random_lm

PROMPTS = [
    "Write a poem about the sea.",
    "What is 2 + 2?",
    "Explain recursion in Python with a short example, please.",
    "Hi",
]
LAYER = 1


def _vectors(lm: LoadedLM, scale: float = 3.0) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(len(PROMPTS), lm.d_model, generator=generator) * scale


class _SkipsDecodeSteps:
    """The bug the API must not have: steer the prompt, skip one-token decode steps."""

    def __init__(self, vectors_ND: Tensor) -> None:
        self.inner = AddVectors(vectors_ND)

    def __call__(self, hidden_BTD: Tensor, rows_B: Tensor) -> Tensor:
        return hidden_BTD if hidden_BTD.shape[1] == 1 else self.inner(hidden_BTD, rows_B)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_equals_uncached_with_intervention(tiny_lm: LoadedLM, temperature: float) -> None:
    steer = AddVectors(_vectors(tiny_lm))
    cached = generate_token_ids(
        tiny_lm,
        PROMPTS,
        GenerationConfig(max_new_tokens=10, temperature=temperature),
        layer=LAYER,
        intervention=steer,
    )
    uncached = generate_token_ids(
        tiny_lm,
        PROMPTS,
        GenerationConfig(max_new_tokens=10, temperature=temperature, use_cache=False),
        layer=LAYER,
        intervention=steer,
    )
    assert cached == uncached
    assert all(len(t) == 10 for t in cached)  # the random model never says EOS
    # The comparison can fail: a hook that skips decode steps differs from its uncached run.
    buggy = _SkipsDecodeSteps(_vectors(tiny_lm))
    buggy_cached = generate_token_ids(
        tiny_lm,
        PROMPTS,
        GenerationConfig(max_new_tokens=10, temperature=temperature),
        layer=LAYER,
        intervention=buggy,
    )
    assert buggy_cached != uncached


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_equals_one_at_a_time(tiny_lm: LoadedLM, temperature: float) -> None:
    steer = AddVectors(_vectors(tiny_lm))
    outs = [
        generate_token_ids(
            tiny_lm,
            PROMPTS,
            GenerationConfig(max_new_tokens=8, temperature=temperature, batch_size=size),
            layer=LAYER,
            intervention=steer,
        )
        for size in (1, 3, 8)
    ]
    assert outs[0] == outs[1] == outs[2]
    if temperature > 0:
        return  # near-uniform random logits: a seeded draw barely moves under steering
    # Each row got its own vector: steering changes every greedy continuation.
    plain = generate_token_ids(
        tiny_lm, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=temperature)
    )
    assert all(a != b for a, b in zip(outs[0], plain, strict=True))


def test_added_vectors_are_generated_once_per_process(
    tiny_lm: LoadedLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    import project.generation as generation

    config = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=11)
    vectors = _vectors(tiny_lm)
    vectors[1] = 0.0  # an unsteered row among steered ones
    expected = generate(tiny_lm, PROMPTS, config, layer=LAYER, intervention=AddVectors(vectors))
    asked: list[int] = []
    real = generation.generate

    def counting(lm, prompts, *args, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(len(prompts))
        return real(lm, prompts, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", counting)
    monkeypatch.setattr(generation, "_ADDED_MEMO", {})
    assert generate_added(tiny_lm, PROMPTS, vectors, config, layer=LAYER) == expected
    # The same rows again (and a duplicate inside one call): nothing new is generated.
    again = torch.cat([vectors, vectors[:1]])
    assert generate_added(tiny_lm, [*PROMPTS, PROMPTS[0]], again, config, layer=LAYER) == [
        *expected,
        expected[0],
    ]
    assert asked == [len(PROMPTS)]
    # Another vector, seed or layer is another continuation: generated, not remembered.
    moved = vectors.clone()
    moved[0] *= 2
    generate_added(tiny_lm, PROMPTS, moved, config, layer=LAYER)
    generate_added(
        tiny_lm, PROMPTS, vectors, GenerationConfig(max_new_tokens=6, seed=12), layer=LAYER
    )
    generate_added(tiny_lm, PROMPTS, vectors, config, layer=0)
    assert asked == [len(PROMPTS), 1, len(PROMPTS), len(PROMPTS)]


def test_zero_vector_reproduces_the_unsteered_model(tiny_lm: LoadedLM) -> None:
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=3)
    zero = AddVectors(torch.zeros(len(PROMPTS), tiny_lm.d_model))
    assert generate(tiny_lm, PROMPTS, config, layer=LAYER, intervention=zero) == generate(
        tiny_lm, PROMPTS, config
    )


def test_sampling_is_seeded_per_prompt(tiny_lm: LoadedLM) -> None:
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=1)
    first = generate_token_ids(tiny_lm, PROMPTS, config)
    # Same prompt, same seed, wherever it sits: duplicates sample identically.
    again = generate_token_ids(tiny_lm, [PROMPTS[2], PROMPTS[0], PROMPTS[2]], config)
    assert again == [first[2], first[0], first[2]]
    other = generate_token_ids(
        tiny_lm, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=1.0, seed=2)
    )
    assert other != first
    explicit = generate_token_ids(tiny_lm, PROMPTS[:2], config, seeds=[7, 7])
    assert explicit != first[:2]


def test_chat_template_is_used(tiny_lm: LoadedLM) -> None:
    ids = prompt_token_ids(tiny_lm, "Hello there")
    text = tiny_lm.tokenizer.decode(ids)
    assert "<|im_start|>user" in text and text.rstrip().endswith("assistant")
    plain = prompt_token_ids(tiny_lm, "Hello there", chat_template=False)
    assert "<|im_start|>" not in tiny_lm.tokenizer.decode(plain)


def test_no_system_prompt_of_the_templates_own(tiny_lm: LoadedLM) -> None:
    """METHODS §3: no system prompt. SmolLM2's template inserts a default one when the
    conversation has none; the prompt gets an empty system turn instead, so the instruction
    is what the model reads (and the prefill is about half as long)."""
    tokenizer = tiny_lm.tokenizer
    default = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], tokenize=False, add_generation_prompt=True
    )
    assert "You are a helpful AI assistant" in default  # the template's own system prompt
    text = tokenizer.decode(prompt_token_ids(tiny_lm, "Hello there"))
    assert "You are a helpful" not in text and "Hello there" in text
    assert text.startswith("<|im_start|>system\n<|im_end|>")
    assert len(text) < len(default)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("max_new_tokens", 0, "max_new_tokens"),
        ("temperature", -1.0, "temperature"),
        ("temperature", "hot", "temperature"),
        ("batch_size", 0, "batch_size"),
        ("compile", "yes", "compile='yes' must be true or false"),
    ],
)
def test_bad_config(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**{field: value})


def test_intervention_needs_a_layer(tiny_lm: LoadedLM) -> None:
    with pytest.raises(ValueError, match="layer"):
        generate(tiny_lm, PROMPTS, intervention=AddVectors(_vectors(tiny_lm)))
    with pytest.raises(ValueError, match="out of range"):
        generate(tiny_lm, PROMPTS, layer=99, intervention=AddVectors(_vectors(tiny_lm)))


def test_row_sampler_draws_from_the_softmax_with_each_rows_own_generator() -> None:
    from project.generation import _RowSampler

    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf")], [2.0, 0.0, -1.0, 0.5]])
    n = 20_000
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    sampler = _RowSampler(generators, temperature=1.0)
    counts = torch.zeros_like(logits)
    for _ in range(n):
        out = sampler(torch.zeros(2, 1, dtype=torch.long), logits.clone())
        assert ((out == 0).sum(-1) == 1).all()  # one finite token per row, for greedy to take
        counts[torch.arange(2), out.argmax(-1)] += 1
    expected = torch.softmax(logits, -1)
    # Within 4 binomial standard deviations of the softmax; a masked token is never drawn.
    sd = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() <= 4 * sd + 1e-9).all(), counts / n
    assert counts[0, 3] == 0
    # A row's draws depend on its generator alone, not on the rows beside it.
    alone = _RowSampler([torch.Generator().manual_seed(2)], temperature=1.0)
    pair = _RowSampler([torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], 1.0)
    for _ in range(50):
        a = alone(torch.zeros(1, 1, dtype=torch.long), logits[1:].clone()).argmax(-1)
        b = pair(torch.zeros(2, 1, dtype=torch.long), logits.clone()).argmax(-1)
        assert a.item() == b[1].item()


def test_compiled_generation_gives_eager_tokens_batch_after_batch() -> None:
    """The GPU path's torch.compile, run on CPU: the steering hook and per-row vectors are in
    the compiled graph (no graph break; steered tokens differ from unsteered ones and equal
    eager's), and a second call with new vectors and sampling reuses the
    compiled graphs instead of compiling again."""
    lm = build_tiny_random_lm(n_layers=2)  # two blocks: the compilation is the test's cost
    counters = torch._dynamo.utils.counters
    graphs_before = counters["stats"]["unique_graphs"]
    breaks_before = sum(counters["graph_break"].values())
    greedy = GenerationConfig(max_new_tokens=6, temperature=0, batch_size=len(PROMPTS))
    sampled = replace(greedy, temperature=1.0)
    unsteered = generate_token_ids(lm, PROMPTS, greedy)
    graphs_after_first = 0
    for seed, config in ((0, greedy), (1, sampled)):
        vectors = torch.randn(
            len(PROMPTS), lm.d_model, generator=torch.Generator().manual_seed(seed)
        )
        steer = AddVectors(vectors * 3.0)
        eager = generate_token_ids(lm, PROMPTS, config, layer=LAYER, intervention=steer)
        assert eager != unsteered
        compiled = replace(config, compile=True)
        assert generate_token_ids(lm, PROMPTS, compiled, layer=LAYER, intervention=steer) == eager
        assert sum(counters["graph_break"].values()) == breaks_before  # hook inside the graph
        graphs = counters["stats"]["unique_graphs"]
        if seed == 0:
            graphs_after_first = graphs
            assert graphs > graphs_before  # it did compile
        else:
            assert graphs == graphs_after_first  # new vectors and sampling: no new graph
    assert "forward" not in vars(lm.model)  # eager again outside generation
    with (
        compiled_forward(lm),
        pytest.raises(RuntimeError, match="already replaced"),
        compiled_forward(lm),
    ):
        pass
