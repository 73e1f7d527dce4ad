"""project.saes: every architecture recovers a planted dictionary; configs, L0, decoder norms,
the sparse training paths' gradients and the save/load round trip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from project.saes import (
    ARCHITECTURES,
    SAEConfig,
    SparseAutoencoder,
    TrainStep,
    build_sae,
    load_sae_dir,
    save_sae,
)
from project.saes.base import SAELoss
from project.saes.sparse import batch_topk

D_IN, N_TRUE, D_SAE = 32, 64, 128
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
L1_FAMILIES = ("relu", "jumprelu", "gated")

# Per-architecture settings for the planted problem (~3 true features per sample, magnitudes
# 1-2). The L1 families get a λ suited to these feature magnitudes; matryoshka's first
# prefix is as wide as the true dictionary, which it must reconstruct alone.
PLANTED_SETTINGS: dict[str, dict] = {
    "relu": {"l1_coefficient": 1.0},
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "jumprelu": {"target_l0": 4},
    "gated": {"l1_coefficient": 3.0},
    "matryoshka": {"k": 4, "matryoshka_prefixes": [64, 128]},
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny tensors: a second thread only adds contention on the 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class PlantedData:
    """A random unit-norm ground-truth dictionary; samples are sparse positive combinations."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        truth_FD = torch.randn(N_TRUE, D_IN, generator=self.gen)
        self.truth_FD = truth_FD / truth_FD.norm(dim=-1, keepdim=True)
        self.offset_D = 0.3 * torch.ones(D_IN)

    def sample(self, n: int) -> Tensor:
        active = torch.rand(n, N_TRUE, generator=self.gen) < 3 / N_TRUE
        magnitudes = 1 + torch.rand(n, N_TRUE, generator=self.gen)
        return (active * magnitudes) @ self.truth_FD + self.offset_D


def make_config(architecture: str, **overrides: object) -> SAEConfig:
    settings = {**PLANTED_SETTINGS[architecture], **overrides}
    return SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, **settings)


def train(
    sae: SparseAutoencoder, data: PlantedData, steps: int, lr: float = 3e-3, batch: int = 256
) -> None:
    sae.initialize_from_data(data.sample(4096))
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    sae.train()
    for i in range(steps):
        out = sae.loss(data.sample(batch), TrainStep(step=i, total_steps=steps))
        optimizer.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_recovers_planted_dictionary(architecture: str) -> None:
    torch.manual_seed(0)
    data = PlantedData()
    sae = build_sae(make_config(architecture))
    train(sae, data, steps=1500)
    sae.eval()
    with torch.no_grad():
        x_ND = data.sample(4096)
        f_NF = sae.encode(x_ND)
        x_hat_ND = sae.decode(f_NF)
        explained = 1 - (x_ND - x_hat_ND).var(dim=0).sum() / x_ND.var(dim=0).sum()
        rows_FD = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
        best_cos = (data.truth_FD @ rows_FD.T).max(dim=1).values
    matched = (best_cos > 0.9).float().mean().item()
    l0 = (f_NF > 0).sum(dim=-1).float().mean().item()
    assert matched >= 0.8, f"{architecture}: only {matched:.0%} of true features matched"
    assert explained >= 0.85, f"{architecture}: explained variance {explained:.3f}"
    assert 1 <= l0 <= 8, f"{architecture}: L0 {l0:.2f}"


# ----------------------------------------------------------------------------- config
def test_unknown_architecture_names_value_and_choices() -> None:
    with pytest.raises(ValueError, match="'nope'.*batchtopk.*topk"):
        SAEConfig(architecture="nope", d_in=8, d_sae=32, k=4)


def test_build_sae_unknown_architecture() -> None:
    cfg = SAEConfig(architecture="topk", d_in=8, d_sae=32, k=4)
    cfg.architecture = "nope"
    with pytest.raises(ValueError, match="'nope'.*relu"):
        build_sae(cfg)


@pytest.mark.parametrize("architecture", TOPK_FAMILY)
@pytest.mark.parametrize("k", [0, -3, 32, 40])
def test_k_out_of_range(architecture: str, k: int) -> None:
    with pytest.raises(ValueError, match=rf"k={k}\b.*d_sae=32"):
        SAEConfig(architecture=architecture, d_in=8, d_sae=32, k=k)


@pytest.mark.parametrize("architecture", TOPK_FAMILY)
def test_topk_family_needs_k(architecture: str) -> None:
    with pytest.raises(ValueError, match="needs k"):
        SAEConfig(architecture=architecture, d_in=8, d_sae=32)


@pytest.mark.parametrize("target", [0.0, -1.0, 32.0])
def test_target_l0_out_of_range(target: float) -> None:
    with pytest.raises(ValueError, match=f"target_l0={target}"):
        SAEConfig(architecture="jumprelu", d_in=8, d_sae=32, target_l0=target)


@pytest.mark.parametrize(
    ("field", "value"),
    [("d_in", 0), ("d_sae", -1), ("dtype", "float8"), ("normalize_activations", "layer_norm")],
)
def test_invalid_fields_are_named(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SAEConfig(**{"architecture": "relu", "d_in": 8, "d_sae": 32, field: value})


def test_target_l0_must_equal_k_and_defaults_to_it() -> None:
    assert SAEConfig(architecture="topk", d_in=8, d_sae=32, k=4).target_l0 == 4
    with pytest.raises(ValueError, match="target_l0=5"):
        SAEConfig(architecture="topk", d_in=8, d_sae=32, k=4, target_l0=5)


def test_matryoshka_prefixes() -> None:
    default = SAEConfig(architecture="matryoshka", d_in=8, d_sae=4608, k=4)
    assert default.matryoshka_prefixes == [144, 432, 1008, 2160, 4608]
    appended = SAEConfig(architecture="matryoshka", d_in=8, d_sae=64, k=4, matryoshka_prefixes=[8])
    assert appended.matryoshka_prefixes == [8, 64]
    with pytest.raises(ValueError, match="matryoshka_prefixes"):
        SAEConfig(architecture="matryoshka", d_in=8, d_sae=64, k=4, matryoshka_prefixes=[16, 8])


def test_config_dict_round_trip() -> None:
    cfg = SAEConfig(architecture="matryoshka", d_in=8, d_sae=64, k=4, metadata={"hook_name": "h"})
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------- behaviour
def test_topk_l0_is_exactly_k() -> None:
    torch.manual_seed(0)
    data = PlantedData()
    sae = build_sae(make_config("topk", k=5))
    train(sae, data, steps=50)
    sae.eval()
    with torch.no_grad():
        f_NF = sae.encode(data.sample(512))
    assert torch.equal((f_NF > 0).sum(dim=-1), torch.full((512,), 5))


def test_topk_drops_negative_preactivations_like_saelens() -> None:
    sae = build_sae(SAEConfig(architecture="topk", d_in=8, d_sae=32, k=4))
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)
        assert sae.encode(torch.randn(16, 8)).count_nonzero() == 0


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_decoder_rows_unit_norm_after_step(architecture: str) -> None:
    torch.manual_seed(0)
    data = PlantedData()
    sae = build_sae(make_config(architecture, unit_norm_decoder=True))
    optimizer = torch.optim.Adam(sae.parameters(), lr=0.1)
    out = sae.loss(data.sample(64), TrainStep(step=100, total_steps=100))
    out.loss.backward()
    sae.before_optimizer_step()
    assert sae.W_dec.grad is not None
    parallel_F = (sae.W_dec.grad * sae.W_dec).sum(dim=-1)
    assert parallel_F.abs().max() < 1e-5
    optimizer.step()
    sae.after_optimizer_step()
    norms_F = sae.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms_F, torch.ones_like(norms_F))


def test_relu_decoder_norms_free_by_default() -> None:
    cfg = SAEConfig(architecture="relu", d_in=8, d_sae=32)
    assert cfg.unit_norm_decoder is False
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((32,), 3.0))


def test_l1_warmup() -> None:
    sae = build_sae(SAEConfig(architecture="relu", d_in=8, d_sae=32, l1_warmup_fraction=0.1))
    assert sae.l1_warmup(TrainStep(0, 1000)) == 0.0
    assert sae.l1_warmup(TrainStep(50, 1000)) == pytest.approx(0.5)
    assert sae.l1_warmup(TrainStep(500, 1000)) == 1.0


def test_dead_fraction_counts_tokens_since_firing() -> None:
    sae = build_sae(
        SAEConfig(architecture="topk", d_in=8, d_sae=32, k=2, dead_tokens_threshold=100)
    )
    x_BD = torch.randn(60, 8)
    sae.train()
    sae.loss(x_BD, TrainStep(0, 10))
    assert sae.dead_fraction() == 0.0
    sae.tokens_since_fired_F[:8] = 1000
    assert sae.dead_fraction() == pytest.approx(8 / 32)


def test_jumprelu_initial_l0_from_data() -> None:
    torch.manual_seed(0)
    data = PlantedData()
    sae = build_sae(make_config("jumprelu", target_l0=6))
    x_ND = data.sample(4096)
    sae.initialize_from_data(x_ND)
    sae.eval()
    with torch.no_grad():
        l0 = (sae.encode(x_ND) > 0).sum(dim=-1).float().mean().item()
    assert l0 == pytest.approx(12, rel=0.05)  # INIT_L0_FACTOR x target


def test_batchtopk_train_mode_keeps_k_per_token_on_average_eval_uses_threshold() -> None:
    torch.manual_seed(0)
    data = PlantedData()
    sae = build_sae(make_config("batchtopk", threshold_start_step=10))
    train(sae, data, steps=30)
    x_BD = data.sample(256)
    with torch.no_grad():
        assert (sae.encode(x_BD) > 0).sum() == 4 * 256  # train mode: batch TopK
        sae.eval()
        pre_BF = sae.preacts(sae.center(x_BD))
        expected = pre_BF.relu() * (pre_BF > sae.threshold)
        assert torch.equal(sae.encode(x_BD), expected)
    assert float(sae.threshold_value) > 0
    assert torch.all(sae.threshold == sae.threshold[0])


def test_batchtopk_threshold_is_the_methods_running_mean() -> None:
    sae = build_sae(SAEConfig(architecture="batchtopk", d_in=8, d_sae=32, k=2))
    sae.train()
    assert sae.threshold_start(20_000) == 1000  # METHODS §1: from step 1000
    assert sae.threshold_start(200) == 20  # a shorter run: after its first 10%
    aux = sae.after_selection(torch.rand(20) + 7, TrainStep(999, 20_000))
    assert float(sae.threshold_value) == 0  # before the start step nothing enters the mean
    assert float(aux["threshold_batch"]) >= 7  # ... but the batch's k·B-th value is logged
    seen = []
    for i in range(5):  # bias-corrected: the first updates give the plain mean
        val_N = torch.rand(20) + i
        seen.append(val_N.min().item())
        sae.after_selection(val_N, TrainStep(1000 + i, 20_000))
    assert float(sae.threshold_value) == pytest.approx(sum(seen) / len(seen), rel=1e-6)
    sae.threshold_updates.fill_(10_000)
    before = float(sae.threshold_value)
    sae.after_selection(torch.full((4,), 100.0), TrainStep(2000, 20_000))  # past the start step
    assert float(sae.threshold_value) == pytest.approx(0.999 * before + 0.001 * 100.0)
    assert torch.all(sae.threshold == sae.threshold_value.float())


def test_batchtopk_calibrate_threshold_gives_l0_k() -> None:
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="batchtopk", d_in=8, d_sae=32, k=3))
    x_ND = torch.randn(500, 8)
    sae.calibrate_threshold(x_ND)
    sae.eval()
    with torch.no_grad():
        assert (sae.encode(x_ND) > 0).sum() == 3 * 500


def test_batch_topk_is_exact_when_rows_saturate() -> None:
    gen = torch.Generator().manual_seed(0)
    acts_BF = torch.rand(64, 100, generator=gen)
    acts_BF[3] += 10  # one token holds far more than row_cap of the batch's largest values
    flat_N, val_N = batch_topk(acts_BF, n_keep=64 * 4, row_cap=16)
    ref_val, ref_flat = acts_BF.reshape(-1).topk(64 * 4)
    assert torch.equal(flat_N, ref_flat.sort().values)
    assert torch.equal(val_N, acts_BF.reshape(-1)[flat_N])


@pytest.mark.parametrize("architecture", TOPK_FAMILY)
def test_sparse_training_path_matches_dense_autograd(architecture: str) -> None:
    """The embedding-bag decoder and the sparse encoder backward give autograd's gradients."""
    torch.manual_seed(0)
    cfg = SAEConfig(
        architecture=architecture,
        d_in=16,
        d_sae=64,
        k=4,
        dtype="float64",
        dead_tokens_threshold=10,
        aux_k=8,
        matryoshka_prefixes=[8, 24, 64] if architecture == "matryoshka" else None,
    )
    sae = build_sae(cfg)
    x_BD = torch.randn(32, 16, dtype=torch.float64) + 0.5
    sae.initialize_from_data(x_BD)
    sae.tokens_since_fired_F[:20] = 100  # 20 dead latents: AuxK is active
    out = sae.loss(x_BD, TrainStep(0, 100))
    out.loss.backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()

    pre_BF = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    if architecture == "topk":
        val_BK, idx_BK = pre_BF.topk(4, dim=-1)
        f_BF = torch.zeros_like(pre_BF).scatter(-1, idx_BK, val_BK.relu())
    else:
        val_N, idx_N = pre_BF.relu().reshape(-1).topk(4 * 32)
        f_BF = torch.zeros_like(pre_BF).reshape(-1).scatter(0, idx_N, val_N).reshape(32, 64)
    x_hat_BD = f_BF @ sae.W_dec + sae.b_dec
    if architecture == "matryoshka":
        prefix_losses = [
            (f_BF[:, :w] @ sae.W_dec[:w] + sae.b_dec - x_BD).pow(2).sum(-1).mean()
            for w in (8, 24, 64)
        ]
        recon = torch.stack(prefix_losses).mean()
    else:
        recon = (x_hat_BD - x_BD).pow(2).sum(-1).mean()
    dead_F = torch.arange(64) < 20
    aux_val, aux_idx = pre_BF.masked_fill(~dead_F, -torch.inf).topk(8, dim=-1)
    aux_f_BF = torch.zeros_like(pre_BF).scatter(-1, aux_idx, aux_val.relu())
    auxk = (aux_f_BF @ sae.W_dec - (x_BD - x_hat_BD).detach()).pow(2).sum(-1).mean()
    (recon + auxk / 32).backward()

    torch.testing.assert_close(out.x_hat_BD, x_hat_BD)
    torch.testing.assert_close(out.f_BF, f_BF.detach())
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, msg=f"gradient of {name}")


def _one_training_step(
    start: SparseAutoencoder, x_BD: Tensor, max_density: float
) -> tuple[SAELoss, dict[str, Tensor], Tensor]:
    """One step of a copy of ``start`` with the given sparse-path switch: its output, its
    gradients and its dead-latent counter."""
    sae = build_sae(start.cfg)
    sae.load_state_dict(start.state_dict())
    sae.sparse_max_density = max_density
    out = sae.loss(x_BD, TrainStep(50, 100))
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    return out, grads, sae.tokens_since_fired_F.clone()


@pytest.mark.parametrize("architecture", L1_FAMILIES)
def test_l1_family_sparse_step_equals_dense_step(architecture: str) -> None:
    """relu/jumprelu/gated: the step restricted to the entries with a gradient gives the dense
    step's loss, reconstruction, latents, L0, firing record and gradients."""
    torch.manual_seed(0)
    cfg = SAEConfig(
        architecture=architecture,
        d_in=16,
        d_sae=256,
        target_l0=8,
        l1_control="fixed" if architecture == "jumprelu" else "target_l0",
        # A wide JumpReLU window, so that inactive entries near θ take part.
        jumprelu_bandwidth=0.2,
        dtype="float64",
    )
    x_BD = torch.randn(64, 16, dtype=torch.float64) * 3 + 0.5
    first = build_sae(cfg)
    first.initialize_from_data(x_BD)
    results = {}
    for path, max_density in (("dense", 0.0), ("sparse", 1.0)):
        results[path] = _one_training_step(first, x_BD, max_density)
    dense, dense_grads, dense_fired = results["dense"]
    sparse, sparse_grads, sparse_fired = results["sparse"]
    # The batch is sparse (else the test compares the dense path with itself) ...
    assert 0 < float(dense.l0) < 0.25 * cfg.d_sae
    if architecture == "jumprelu":
        # ... and JumpReLU's window holds inactive entries, whose gradient the sparse step
        # must keep.
        pre_BF = first.preacts(first.center(x_BD))
        below_BF = (pre_BF <= first.threshold) & (pre_BF > first.threshold - 0.1 * 3 * 4)
        assert int(below_BF.sum()) > 0
    torch.testing.assert_close(sparse.loss, dense.loss)
    torch.testing.assert_close(sparse.x_hat_BD, dense.x_hat_BD)
    torch.testing.assert_close(sparse.f_BF, dense.f_BF.detach())
    torch.testing.assert_close(sparse.l0, dense.l0)
    for name, aux in dense.aux.items():
        torch.testing.assert_close(sparse.aux[name], aux, msg=f"aux {name}")
    assert torch.equal(sparse_fired, dense_fired)
    assert set(sparse_grads) == set(dense_grads)
    for name, grad in dense_grads.items():
        assert grad.abs().sum() > 0 or name == "b_dec", f"{name} has no gradient"
        torch.testing.assert_close(sparse_grads[name], grad, msg=f"gradient of {name}")


@pytest.mark.parametrize("architecture", L1_FAMILIES)
def test_l1_family_sparse_step_is_the_same_at_any_thread_count(architecture: str) -> None:
    """The same SAE trained on one thread (a Ray worker) and on two (the local executor) must
    be the same SAE: the sparse step's gradients are bitwise equal at 1 and 2 threads. (Large
    enough for torch to split the scatter-adds between threads.)"""
    torch.manual_seed(0)
    x_BD = torch.randn(512, 576) * 3 + torch.randn(576)
    cfg = SAEConfig(
        architecture=architecture, d_in=576, d_sae=2304, target_l0=64, l1_control="target_l0"
    )
    first = build_sae(cfg)
    first.initialize_from_data(x_BD)
    grads = []
    threads_before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grads.append(_one_training_step(first, x_BD, max_density=1.0)[1])
    finally:
        torch.set_num_threads(threads_before)  # later tests run at the machine's count
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), f"gradient of {name} depends on the threads"


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_save_load_round_trip_is_bit_identical(architecture: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = PlantedData()
    sae = build_sae(make_config(architecture, metadata={"model_name": "m", "hook_name": "h"}))
    train(sae, data, steps=20)
    sae.eval()
    path = save_sae(sae, tmp_path / "sae")
    assert (path / "cfg.json").is_file() and (path / "sae_weights.safetensors").is_file()
    loaded = load_sae_dir(path)
    assert type(loaded) is type(sae)
    assert not loaded.training
    assert loaded.cfg == sae.cfg
    reference = sae.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, reference[name]), name
    x_ND = data.sample(256)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x_ND), sae.encode(x_ND))
        assert torch.equal(loaded(x_ND), sae(x_ND))


# ----------------------------------------------------------------------------- L0 control
@pytest.mark.parametrize("architecture", ["relu", "gated"])
@pytest.mark.parametrize("target", [3.0, 12.0])
def test_l1_controller_brings_l0_to_the_target(architecture: str, target: float) -> None:
    torch.manual_seed(0)
    data = PlantedData()
    cfg = make_config(architecture, target_l0=target, l1_control="target_l0")
    sae = build_sae(cfg)
    train(sae, data, steps=400)
    sae.eval()
    with torch.no_grad():
        l0 = (sae.encode(data.sample(4096)) > 0).sum(dim=-1).float().mean().item()
    assert target * 0.8 <= l0 <= target * 1.2, f"{architecture}: L0 {l0:.2f}, target {target}"


def test_l1_control_needs_a_target_and_a_known_mode() -> None:
    with pytest.raises(ValueError, match="l1_control=.pid.*valid.*target_l0"):
        SAEConfig(architecture="relu", d_in=8, d_sae=32, l1_control="pid")
    with pytest.raises(ValueError, match="needs target_l0"):
        SAEConfig(architecture="relu", d_in=8, d_sae=32, l1_control="target_l0")


def test_training_state_round_trip_is_not_part_of_the_saved_sae(tmp_path: Path) -> None:
    sae = build_sae(make_config("relu", target_l0=4.0, l1_control="target_l0"))
    sae.tokens_since_fired_F.fill_(7)
    sae.l1_controller.log_gain.fill_(1.5)
    state = sae.training_state()
    fresh = build_sae(sae.cfg)
    fresh.load_training_state(state)
    assert torch.equal(fresh.tokens_since_fired_F, sae.tokens_since_fired_F)
    assert float(fresh.l1_controller.log_gain) == 1.5
    assert not set(state) & set(sae.state_dict())  # not in the SAELens directory
    with pytest.raises(ValueError, match="'bogus'"):
        fresh.load_training_state({"bogus": torch.zeros(1)})
