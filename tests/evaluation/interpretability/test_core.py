"""core on a tiny LM: agreement with the formulas, orderings, and the hook cache.

The tiny LM is random except for two things that give it a real next-token distribution: a
constant direction added to every token embedding, and an lm_head that reads the stdlib
unigram log-frequencies off that direction. So the clean LM beats the uniform distribution of
a zero-ablated hook, and CE / KL scores mean something.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evaluation.interpretability.core import CoreConfig, compute, eval_windows
from project import hook_cache as hook_cache_module
from project.corpus import iter_texts, region_description, resolve_corpus, token_windows
from project.hook_cache import HookCache, logits_from_hook
from project.lm import (
    TINY_FAMILIES,
    LoadedLM,
    build_tiny_random_lm,
    residual_activations,
    splice_residual,
)
from project.saes import SAEConfig, SparseAutoencoder, TrainStep, build_sae

LAYER = 1
SMALL = CoreConfig(context_size=32, n_tokens=2048, n_ce_windows=16, batch_size=8)


@pytest.fixture(scope="module")
def unigram_lm(saeflow_cache_dir) -> LoadedLM:
    lm = build_tiny_random_lm("llama", seed=3)
    vocab, d = lm.model.lm_head.weight.shape
    windows = torch.stack(
        list(token_windows(iter_texts(resolve_corpus("stdlib")), lm.tokenizer, 32, 32 * 256))
    )
    with torch.no_grad():
        counts = torch.bincount(windows.flatten(), minlength=vocab).double() + 0.1
        log_freq = (counts / counts.sum()).log()
        log_freq = (log_freq - log_freq.mean()).float()
        direction = torch.randn(d, generator=torch.Generator().manual_seed(0))
        direction /= direction.norm()
        lm.model.model.embed_tokens.weight.mul_(10).add_(2.0 * direction)
        lm.model.lm_head.weight.mul_(10).add_(log_freq[:, None] * direction / math.sqrt(d))
    return lm


@pytest.fixture(scope="module")
def train_acts(unigram_lm: LoadedLM) -> torch.Tensor:
    """Hook activations of the stdlib's harvest region (core reads its eval region)."""
    windows = torch.stack(
        list(
            token_windows(iter_texts(resolve_corpus("stdlib")), unigram_lm.tokenizer, 32, 32 * 128)
        )
    )
    return residual_activations(unigram_lm, windows, LAYER)[:, 1:].reshape(-1, unigram_lm.d_model)


def test_core_reads_only_the_eval_region_and_records_it(unigram_lm: LoadedLM) -> None:
    spec = resolve_corpus("stdlib")
    ids_WT = eval_windows(SMALL, unigram_lm.tokenizer)
    expected = list(token_windows(iter_texts(spec, "eval"), unigram_lm.tokenizer, 32, 32 * 80))
    assert torch.equal(ids_WT, torch.stack(expected[: ids_WT.shape[0]]))
    # No window shares a 20-token run with the harvest region's first windows.
    harvest_WT = torch.stack(
        list(token_windows(iter_texts(spec, "harvest"), unigram_lm.tokenizer, 32, 32 * 400))
    )
    grams = {tuple(w[i : i + 20].tolist()) for w in harvest_WT for i in range(1, 12)}
    assert not any(tuple(w[i : i + 20].tolist()) in grams for w in ids_WT for i in range(1, 12))
    assert SMALL.corpus_region == region_description(spec)
    assert "1 in 4" in SMALL.corpus_region


def train_topk(acts_ND: torch.Tensor, k: int, steps: int = 120) -> SparseAutoencoder:
    """A TopK SAE fitted briefly with the architecture's own loss."""
    torch.manual_seed(0)
    d = acts_ND.shape[1]
    sae = build_sae(SAEConfig(architecture="topk", d_in=d, d_sae=4 * d, k=k))
    sae.initialize_from_data(acts_ND[:2048])
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(steps):
        batch_BD = acts_ND[torch.randint(0, acts_ND.shape[0], (256,))]
        loss = sae.loss(batch_BD, TrainStep(step, steps)).loss
        optimizer.zero_grad()
        loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
    return sae.eval()


@pytest.fixture(scope="module")
def trained_k8(train_acts: torch.Tensor) -> SparseAutoencoder:
    return train_topk(train_acts, k=8)


@pytest.fixture(scope="module")
def core_cache() -> HookCache:
    return HookCache()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_running_from_the_hook_equals_a_full_forward(family: str, saeflow_cache_dir) -> None:
    lm = build_tiny_random_lm(family)
    ids_BT = torch.randint(0, 2000, (3, 12), generator=torch.Generator().manual_seed(1))
    acts_BTD = residual_activations(lm, ids_BT, LAYER)
    edited_BTD = 0.5 * acts_BTD + 0.1
    with torch.no_grad(), splice_residual(lm, LAYER, lambda h: edited_BTD):
        expected = lm.model(input_ids=ids_BT).logits
    torch.testing.assert_close(logits_from_hook(lm, LAYER, ids_BT, edited_BTD), expected)
    with torch.no_grad():
        clean = lm.model(input_ids=ids_BT).logits
    torch.testing.assert_close(logits_from_hook(lm, LAYER, ids_BT, acts_BTD), clean)
    # Zero ablation: what follows the hook no longer depends on the tokens (core relies on it).
    zero = logits_from_hook(lm, LAYER, ids_BT, torch.zeros_like(acts_BTD))
    torch.testing.assert_close(zero[1:], zero[:1].expand_as(zero[1:]))
    # The real blocks are back in place.
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids_BT).logits, clean)


def _ce(logits_BTV: torch.Tensor, ids_BT: torch.Tensor) -> float:
    return F.cross_entropy(
        logits_BTV[:, :-1].flatten(0, 1), ids_BT[:, 1:].flatten(), reduction="mean"
    ).item()


def _kl(clean_BTV: torch.Tensor, other_BTV: torch.Tensor) -> float:
    p = F.log_softmax(clean_BTV[:, :-1].double(), dim=-1)
    q = F.log_softmax(other_BTV[:, :-1].double(), dim=-1)
    return F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean().item()


def test_core_agrees_with_an_independent_computation(
    unigram_lm: LoadedLM, trained_k8: SparseAutoencoder, core_cache: HookCache
) -> None:
    lm, sae = unigram_lm, trained_k8
    metrics = compute(sae, lm, LAYER, SMALL, core_cache).flat_metrics()

    # Reconstruction: the same tokens (positions 1.. of each window), straight from the LM.
    windows_WT = eval_windows(SMALL, lm.tokenizer)
    acts_WTD = torch.cat(
        [
            residual_activations(lm, windows_WT[i : i + 4], LAYER)
            for i in range(0, len(windows_WT), 4)
        ]
    )
    x_ND = acts_WTD[:, 1:].reshape(-1, lm.d_model)[: SMALL.n_tokens].double()
    with torch.no_grad():
        f_NF = sae.encode(x_ND.float())
        x_hat_ND = sae.decode(f_NF).double()
    l0 = (f_NF != 0).sum(-1).double().mean().item()
    ev = 1 - ((x_ND - x_hat_ND).var(dim=0).sum() / x_ND.var(dim=0).sum()).item()
    assert metrics["l0"] == pytest.approx(l0, abs=1e-4)
    assert metrics["explained_variance"] == pytest.approx(ev, abs=1e-4)
    assert metrics["mse"] == pytest.approx((x_ND - x_hat_ND).pow(2).mean().item(), rel=1e-4)
    cossim = F.cosine_similarity(x_ND, x_hat_ND, dim=-1).mean().item()
    assert metrics["cossim"] == pytest.approx(cossim, abs=1e-4)

    # CE / KL: plain full forwards with a hook, every predicted position of the CE windows.
    ids_BT = windows_WT[: SMALL.n_ce_windows]

    def splice_sae(h_BTD: torch.Tensor) -> torch.Tensor:
        out = h_BTD.clone()
        out[:, 1:] = sae.decode(sae.encode(h_BTD[:, 1:]))  # position 0 (BOS) kept
        return out

    with torch.no_grad():
        clean = lm.model(input_ids=ids_BT).logits
        with splice_residual(lm, LAYER, splice_sae):
            spliced = lm.model(input_ids=ids_BT).logits
        with splice_residual(lm, LAYER, torch.zeros_like):
            ablated = lm.model(input_ids=ids_BT).logits
    ce_clean, ce_sae, ce_abl = _ce(clean, ids_BT), _ce(spliced, ids_BT), _ce(ablated, ids_BT)
    kl_sae, kl_abl = _kl(clean, spliced), _kl(clean, ablated)
    assert ce_abl > ce_clean + 0.5  # the fixture's LM is better than uniform
    assert metrics["ce_loss_score"] == pytest.approx(
        (ce_abl - ce_sae) / (ce_abl - ce_clean), abs=1e-3
    )
    assert metrics["kl_div_score"] == pytest.approx((kl_abl - kl_sae) / kl_abl, abs=1e-3)
    assert metrics["ce_loss_without_sae"] == pytest.approx(ce_clean, abs=1e-4)
    assert metrics["ce_loss_with_ablation"] == pytest.approx(ce_abl, abs=1e-4)
    assert metrics["kl_div_with_sae"] == pytest.approx(kl_sae, abs=1e-4)


def test_random_sae_scores_far_below_a_trained_one(
    unigram_lm: LoadedLM, trained_k8: SparseAutoencoder, core_cache: HookCache
) -> None:
    trained = compute(trained_k8, unigram_lm, LAYER, SMALL, core_cache).flat_metrics()
    torch.manual_seed(1)
    random_sae = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=256, k=8)).eval()
    random = compute(random_sae, unigram_lm, LAYER, SMALL, core_cache).flat_metrics()
    assert trained["explained_variance"] > 0.5 > random["explained_variance"] + 0.5
    assert trained["cossim"] > random["cossim"] + 0.15
    assert trained["ce_loss_score"] > random["ce_loss_score"] + 0.3
    assert trained["kl_div_score"] > random["kl_div_score"] + 0.2
    assert trained["mse"] < 0.5 * random["mse"]


def test_larger_k_explains_more_variance(
    unigram_lm: LoadedLM,
    train_acts: torch.Tensor,
    trained_k8: SparseAutoencoder,
    core_cache: HookCache,
) -> None:
    k2 = compute(train_topk(train_acts, k=2), unigram_lm, LAYER, SMALL, core_cache)
    k8 = compute(trained_k8, unigram_lm, LAYER, SMALL, core_cache)
    assert k2.metrics["sparsity"]["l0"] == pytest.approx(2, abs=0.05)
    assert k8.metrics["sparsity"]["l0"] == pytest.approx(8, abs=0.2)
    ev2 = k2.metrics["reconstruction_quality"]["explained_variance"]
    ev8 = k8.metrics["reconstruction_quality"]["explained_variance"]
    assert ev8 > ev2 + 0.03


def test_output_has_saebench_categories(
    unigram_lm: LoadedLM, trained_k8: SparseAutoencoder, core_cache: HookCache
) -> None:
    out = compute(trained_k8, unigram_lm, LAYER, SMALL, core_cache)
    assert list(out.metrics)[:5] == [
        "model_behavior_preservation",
        "model_performance_preservation",
        "reconstruction_quality",
        "shrinkage",
        "sparsity",
    ]
    misc = out.metrics["misc_metrics"]
    assert misc["frac_dead_latents"] == pytest.approx(1 - misc["frac_alive"])
    density = torch.tensor(out.unstructured["feature_density"])
    assert misc["freq_over_1_percent"] == pytest.approx((density > 0.01).float().mean().item())
    assert len(density) == trained_k8.cfg.d_sae


def test_hook_activations_are_computed_once_for_every_sae(
    tiny_lm: LoadedLM, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = hook_cache_module.residual_activations

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(hook_cache_module, "residual_activations", counting)
    config = CoreConfig(context_size=16, n_tokens=128, n_ce_windows=4, batch_size=4)
    cache = HookCache(tmp_path / "hooks", batch_size=4)
    saes = [
        build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=128, k=k)).eval() for k in (2, 4)
    ]
    compute(saes[0], tiny_lm, LAYER, config, cache)
    n_first = len(calls)
    assert n_first == math.ceil(config.n_windows / 4)
    compute(saes[1], tiny_lm, LAYER, config, cache)
    assert len(calls) == n_first  # second SAE: no LM run up to the hook
    # A new process (fresh cache object) reads the same activations from disk.
    on_disk = HookCache(tmp_path / "hooks")
    fresh = compute(saes[1], tiny_lm, LAYER, config, on_disk)
    again = compute(saes[1], tiny_lm, LAYER, config, cache)
    assert len(calls) == n_first
    assert fresh.flat_metrics() == pytest.approx(again.flat_metrics(), abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_tokens": 0}, "n_tokens=0"),
        ({"context_size": 2}, "context_size=2"),
        ({"n_ce_windows": -1}, "n_ce_windows=-1"),
        ({"dataset": ""}, "dataset"),
    ],
)
def test_bad_core_config_is_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CoreConfig(**overrides)


def test_missing_corpus_fails_validation() -> None:
    with pytest.raises(ValueError, match="/no/such/corpus.jsonl"):
        CoreConfig(dataset="/no/such/corpus.jsonl").validate()
