"""model_training: losses by hand, tiny training runs, ONNX parity, calibration, bundles."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from scipy import ndimage

from headscreen.bundle import load_bundle
from headscreen.errors import BundleError
from headscreen.model_training import losses
from headscreen.model_training.bundles import BundleSpec, write_model_bundle
from headscreen.model_training.calibration import (
    calibrate,
    error_map_scale,
    select_score_weights,
    threshold_at_specificity,
)
from headscreen.model_training.export_onnx import FAnoGANGraph, VaeGraph, export_and_check
from headscreen.model_training.networks import VAE3D, GanPreset, VaePreset
from headscreen.model_training.runtime import Samples, pick_device
from headscreen.model_training.train_fanogan import FAnoGANConfig, evaluate_izi_f, train_fanogan
from headscreen.model_training.train_vae import VaeConfig, coarse_noise, train_vae

TINY_GAN = GanPreset(size=16, latent=16, channels=(4, 8))
TINY_VAE = VaePreset(latent=16, channels=(4, 8), age_hidden=16)


def smooth_volumes(n: int, grid: tuple[int, int, int], seed: int) -> Samples:
    """Smooth random blobs in [-1, 1] whose brightness follows age (learnable)."""
    rng = np.random.default_rng(seed)
    ages = rng.uniform(20, 85, n)
    noise = rng.normal(size=(n, *grid))
    images = np.stack([ndimage.gaussian_filter(v, 2.0) for v in noise])
    images = images / np.abs(images).max() * 0.5 + (ages[:, None, None, None] - 52.5) / 100
    return Samples(images.astype(np.float32), ages)


@pytest.fixture(scope="module")
def cpu() -> torch.device:
    return pick_device("cpu", threads=1)


# ---------------------------------------------------------------- losses by hand


def test_gradient_penalty_of_a_linear_critic_is_lambda_times_norm_minus_one_squared() -> None:
    w = torch.tensor([3.0, 0.0, 4.0])  # ||w|| = 5 everywhere

    def critic(x: torch.Tensor) -> torch.Tensor:
        return (x * w).sum(1)

    real, fake = torch.ones(2, 3), torch.zeros(2, 3)
    assert losses.gradient_penalty(critic, real, fake).item() == pytest.approx(10 * (5 - 1) ** 2)


def test_gradient_penalty_uses_the_interpolated_point() -> None:
    def critic(x: torch.Tensor) -> torch.Tensor:
        return (x**2).sum(1)  # gradient 2 * x_hat

    real, fake = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    # eps = 1 -> x_hat = real, |grad| = 10 -> 10 * 81; eps = 0.5 -> |grad| = 5 -> 10 * 16
    assert losses.gradient_penalty(critic, real, fake, eps=torch.tensor([1.0])).item() == pytest.approx(810.0)
    assert losses.gradient_penalty(critic, real, fake, eps=torch.tensor([0.5])).item() == pytest.approx(160.0)


def test_wasserstein_terms() -> None:
    d_real, d_fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    assert losses.critic_wasserstein(d_real, d_fake).item() == pytest.approx(-0.5 - 2.0)
    assert losses.generator_loss(d_fake).item() == pytest.approx(0.5)


def test_izi_f_per_sample_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    recon = torch.zeros(2, 2)
    fx, fr = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]]), torch.zeros(2, 3)
    # sample 0: (1 + 4) / 2 + 0.5 * 3 / 3 = 3.0; sample 1: 0 + 0.5 * 4 / 3
    expected = [3.0, 0.5 * 4 / 3]
    assert losses.izi_f_per_sample(x, recon, fx, fr, kappa=0.5).tolist() == pytest.approx(expected)
    assert losses.izi_f_loss(x, recon, fx, fr, kappa=0.5).item() == pytest.approx(sum(expected) / 2)


def test_focal_term_by_hand() -> None:
    error = torch.zeros(2, 1, 7, 7, 7)
    error[0, 0, 1:4, 1:4, 1:4] = 2.0  # a 3^3 cube: the best 3^3 window sees all of it
    error[1, 0, :, :, 3] = 0.9  # a thin sheet: any 3^3 window sees at most a third of it
    assert losses.focal_per_sample(error, kernel=3).tolist() == pytest.approx([2.0, 0.3])
    # The 5^3 window holds the whole cube: 27 * 2 / 125.
    assert losses.focal_per_sample(error[:1], kernel=5).item() == pytest.approx(54 / 125)


def test_kl_per_sample_by_hand() -> None:
    mu = torch.tensor([[0.0, 1.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    expected = (0.0 + 0.5 * (1 + 2 - 1 - math.log(2.0))) / 2
    assert losses.kl_per_sample(mu, logvar).item() == pytest.approx(expected)
    assert losses.kl_per_sample(torch.zeros(3, 4), torch.zeros(3, 4)).tolist() == [0.0, 0.0, 0.0]


def test_vae_loss_by_hand() -> None:
    x, recon = torch.ones(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2)
    mu, logvar = torch.tensor([[1.0]]), torch.tensor([[0.0]])  # KL = 0.5
    parts = losses.vae_loss(x, recon, mu, logvar, torch.tensor([60.0]), torch.tensor([50.0]), beta=2.0, gamma=3.0)
    assert parts.rec.item() == pytest.approx(1.0)
    assert parts.kl.item() == pytest.approx(0.5)
    assert parts.age.item() == pytest.approx(10.0)
    assert parts.total.item() == pytest.approx(1.0 + 2.0 * 0.5 + 3.0 * 10.0 / 100.0)


def test_combined_anomaly_score_by_hand() -> None:
    rec, kl, gap = np.array([0.2, 0.1]), np.array([0.5, 0.0]), np.array([-10.0, 4.0])
    score = losses.anomaly_score(rec, kl, gap, alpha=2.0, beta=1.0, gamma=0.1)
    assert score.tolist() == pytest.approx([0.4 + 0.5 + 1.0, 0.2 + 0.0 + 0.4])
    assert losses.anomaly_score(rec, kl, None, 2.0, 1.0, 0.1).tolist() == pytest.approx([0.9, 0.2])


def test_coarse_noise_is_smooth_inside_the_brain_and_leaves_the_background() -> None:
    images = torch.full((2, 1, 32, 32, 32), -1.0)
    images[:, :, 4:28, 4:28, 4:28] = 0.1  # a brain at 0.1 in a background at the range's minimum
    inside = images > -1.0
    noisy = coarse_noise(images, sigma=0.2, cells=8, generator=torch.Generator().manual_seed(0))
    noise = (noisy - images)[inside]
    assert torch.equal(noisy[~inside], images[~inside])
    assert 0.1 < float(noise.std()) < 0.3  # the asked-for SD, less what upsampling smooths away
    # coarse: neighbouring voxels move together (white noise of this SD would differ by ~0.28)
    step = (noisy - images)[:, :, 5:27, 5:27, 6:27] - (noisy - images)[:, :, 5:27, 5:27, 5:26]
    assert float(step.abs().mean()) < 0.05
    assert not torch.equal(noisy[0], noisy[1])  # each head its own noise
    assert float(noisy.max()) <= 1.0 and float(noisy.min()) >= -1.0
    bright = coarse_noise(torch.where(inside, 0.95, -1.0), 0.5, 8, torch.Generator().manual_seed(1))
    assert float(bright.max()) == 1.0  # clipped as preprocessing clips


# ---------------------------------------------------------------- calibration


def test_threshold_at_95_specificity_on_a_known_distribution() -> None:
    scores = np.random.default_rng(3).permutation(np.arange(1, 101, dtype=float))
    threshold = threshold_at_specificity(scores, 0.95)
    assert threshold == 95.0
    assert np.mean(scores <= threshold) == pytest.approx(0.95)
    with pytest.raises(ValueError, match="specificity"):
        threshold_at_specificity(scores, 1.0)


def test_calibrate_sorts_reference_and_takes_voxel_p99_inside_masks() -> None:
    rng = np.random.default_rng(4)
    maps = rng.uniform(0, 1, size=(5, 8, 8, 8))
    masks = np.zeros(maps.shape, bool)
    masks[:, 2:6, 2:6, 2:6] = True
    maps[~masks] = 50.0  # outside the brain must not count
    result = calibrate(np.array([3.0, 1.0, 2.0]), maps, masks)
    assert result.reference_scores == [1.0, 2.0, 3.0]
    assert result.n == 3 and result.threshold == 3.0
    assert result.error_map_scale == pytest.approx(np.percentile(maps[masks], 99))
    assert 0.95 < result.error_map_scale < 1.0
    assert error_map_scale(np.zeros((1, 2, 2, 2))) > 0


def test_weight_search_finds_the_discriminative_term() -> None:
    rng = np.random.default_rng(5)
    healthy = {"rec": rng.normal(1, 0.1, 50), "kl": rng.normal(0, 1, 50), "age_gap": rng.normal(0, 5, 50)}
    anomalous = {"rec": rng.normal(1, 0.1, 50), "kl": rng.normal(0, 1, 50), "age_gap": rng.normal(0, 5, 50) + 20}
    weights = select_score_weights(healthy, anomalous, base="kl")
    assert weights.get("age_gap") > 0
    assert weights.validation_auroc > 0.95


def test_weight_search_keeps_the_base_term_alone_when_nothing_else_helps() -> None:
    rng = np.random.default_rng(6)
    healthy = {"izi_f": rng.normal(0, 1, 40), "focal": rng.normal(0, 1, 40)}
    anomalous = {"izi_f": rng.normal(10, 1, 40), "focal": rng.normal(0, 1, 40)}
    weights = select_score_weights(healthy, anomalous, base="izi_f")
    assert weights.terms == {"izi_f": 1.0, "focal": 0.0}


def test_every_combination_is_ranked_as_one_combination_alone_ties_included() -> None:
    from headscreen.model_training.calibration import _rank_every_combination, _ranking

    rng = np.random.default_rng(9)
    values = rng.normal(0, 1, (4, 30)).round(1)  # rounding makes ties
    values[:, 25:] = values[:, :5]  # five lesion cases that are healthy scans: exact ties
    labels = np.r_[np.zeros(20), np.ones(10)]
    weights = rng.choice([0.0, 0.3, 1.0, 3.0], (50, 4))
    weights[0] = 0.0  # every score zero: AUROC 0.5, no spread
    ranks = _rank_every_combination(weights, values, labels)
    for w, rank in zip(weights, ranks):
        expected = _ranking(labels, sum(wi * values[i] for i, wi in enumerate(w) if wi) + np.zeros(30))
        assert rank.tolist() == pytest.approx(list(expected), abs=1e-12)


def test_own_auroc_agrees_with_scikit_learn_including_ties() -> None:
    from headscreen.model_training.scoring import detection_metrics, rank_auroc

    rng = np.random.default_rng(8)
    healthy, anomalous = rng.normal(0, 1, 40).round(1), rng.normal(0.8, 1, 30).round(1)  # rounding makes ties
    metrics = detection_metrics(healthy, anomalous, threshold=0.5)
    assert metrics["auroc"] == pytest.approx(rank_auroc(healthy, anomalous), abs=1e-12)
    assert metrics["auroc_mann_whitney"] == metrics["auroc"]
    assert rank_auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert metrics["specificity_at_threshold"] == pytest.approx(np.mean(healthy <= 0.5))


# ---------------------------------------------------------------- training and export


@pytest.fixture(scope="module")
def trained_gan(tmp_path_factory: pytest.TempPathFactory, cpu: torch.device):
    data = smooth_volumes(24, (16, 16, 16), seed=0)
    cfg = FAnoGANConfig(preset=TINY_GAN, wgan_epochs=3, encoder_epochs=4, finetune_epochs=3, batch_size=4,
                        n_critic=2, lr_encoder=1e-3, lr_finetune=5e-4)
    work = tmp_path_factory.mktemp("gan")
    return data, cfg, train_fanogan(data, cfg, work, cpu, val=data, progress=False)


def test_fanogan_three_stages_run_and_the_encoder_loss_decreases(trained_gan) -> None:
    _, cfg, result = trained_gan
    rows = result.metrics_path.read_text().splitlines()[1:]
    stages = [r.split(",")[0] for r in rows]
    assert stages == ["wgan"] * 3 + ["encoder"] * 4 + ["finetune"] * 3
    izi = [float(r.split(",")[7]) for r in rows if not r.startswith("wgan")]
    assert izi[-1] < izi[0]
    assert result.steps == 10 * (24 // 4)


def test_fanogan_export_matches_pytorch_and_has_a_dynamic_batch(trained_gan, tmp_path: Path, cpu) -> None:
    data, cfg, result = trained_gan
    graph = FAnoGANGraph(result.nets.encoder, result.nets.generator, result.nets.critic, cfg.kappa)
    diff = export_and_check(graph, tmp_path / "m.onnx", data.images[:2], data.ages[:2])
    assert diff < 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    error_map, izi_f, focal = session.run(["error_map", "izi_f", "focal"], {"image": data.images[:5, None]})
    assert error_map.shape == (5, 1, 16, 16, 16) and izi_f.shape == (5,)
    assert focal == pytest.approx(losses.focal_per_sample(torch.from_numpy(error_map)).numpy(), abs=1e-5)
    expected = evaluate_izi_f(result.nets, data.subset(np.arange(5)), cfg.kappa, cpu)
    assert izi_f == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("variant", ["vae", "vae_ac", "vae_ap"])
def test_vae_variants_train_and_export(variant: str, tmp_path: Path, cpu) -> None:
    data = smooth_volumes(16, (12, 14, 10), seed=1)  # not a multiple of 4: exercises padding
    cfg = VaeConfig(preset=TINY_VAE, variant=variant, epochs=6, batch_size=4, seed=2)
    result = train_vae(data, cfg, tmp_path / "run", cpu, progress=False)
    losses_per_epoch = [float(r.split(",")[2]) for r in result.metrics_path.read_text().splitlines()[1:]]
    assert len(losses_per_epoch) == 6 and losses_per_epoch[-1] < losses_per_epoch[0]
    graph = VaeGraph(result.model)
    assert export_and_check(graph, tmp_path / "v.onnx", data.images[:3], data.ages[:3]) < 1e-4
    outputs = [o.name for o in ort.InferenceSession(str(tmp_path / "v.onnx")).get_outputs()]
    assert outputs == ["error_map", "rec", "kl", "focal"] + (["age"] if variant == "vae_ap" else [])


@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_vae_trains_on_noisy_inputs_only_when_asked(sigma: float, tmp_path: Path, cpu,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from headscreen.model_training import train_vae as module

    seen: list[float] = []

    def spy(images: torch.Tensor, *args: object) -> torch.Tensor:
        noisy = coarse_noise(images, *args)  # type: ignore[arg-type]
        seen.append(float((noisy - images).abs().max()))
        return noisy

    monkeypatch.setattr(module, "coarse_noise", spy)
    data = smooth_volumes(8, (8, 8, 8), seed=7)
    cfg = VaeConfig(preset=VaePreset(latent=8, channels=(4,), age_hidden=8), epochs=2, batch_size=4,
                    denoise_sigma=sigma, denoise_cells=2)
    train_vae(data, cfg, tmp_path / "run", cpu, progress=False)
    assert len(seen) == (4 if sigma else 0) and all(change > 0 for change in seen)


def test_vae_resume_continues_to_the_same_weights(tmp_path: Path, cpu) -> None:
    data = smooth_volumes(8, (8, 8, 8), seed=6)
    preset = VaePreset(latent=8, channels=(4,), age_hidden=8)
    straight = train_vae(data, VaeConfig(preset=preset, epochs=3, batch_size=4), tmp_path / "a", cpu, progress=False)
    # Interrupted after two of three epochs: the learning-rate schedule still spans three.
    train_vae(data, VaeConfig(preset=preset, epochs=2, schedule_epochs=3, batch_size=4), tmp_path / "b", cpu,
              progress=False)
    resumed = train_vae(data, VaeConfig(preset=preset, epochs=3, batch_size=4), tmp_path / "b", cpu,
                        resume=True, progress=False)
    assert resumed.epochs == 1
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b), name
    assert len(resumed.metrics_path.read_text().splitlines()) == 1 + 3


def test_fanogan_resume_skips_finished_stages(trained_gan, tmp_path: Path, cpu) -> None:
    data, cfg, _ = trained_gan
    short = FAnoGANConfig(preset=TINY_GAN, wgan_epochs=1, encoder_epochs=1, finetune_epochs=0, batch_size=4)
    train_fanogan(data, short, tmp_path, cpu, progress=False)
    longer = FAnoGANConfig(preset=TINY_GAN, wgan_epochs=1, encoder_epochs=2, finetune_epochs=1, batch_size=4)
    resumed = train_fanogan(data, longer, tmp_path, cpu, resume=True, progress=False)
    assert resumed.epochs == 2
    stages = [r.split(",")[0] for r in resumed.metrics_path.read_text().splitlines()[1:]]
    assert stages == ["wgan", "encoder", "encoder", "finetune"]


# ---------------------------------------------------------------- bundles


def _bundle_spec(grid: tuple[int, int, int], diff: float) -> BundleSpec:
    from headscreen.model_training.calibration import Calibration

    return BundleSpec(
        name="test-fanogan", version="0.0.1", modality="CT", method="fanogan", description="tiny test bundle",
        grid=grid, preprocessing={"target_shape": list(grid)}, score_terms={"izi_f": 1.0}, age_gap_weight=0.0,
        score_definition="izi_f", calibration=Calibration([0.3, 0.1, 0.2], 0.3, 0.95, 0.5, 3),
        age_supported=False, age_validation_mae=None, training={"command": "pytest", "seed": 0},
        metrics={"auroc": 0.5}, parity_max_abs_diff=diff,
    )


def test_bundle_round_trips_through_the_daemon_loader_and_refuses_tampering(trained_gan, tmp_path: Path) -> None:
    data, cfg, result = trained_gan
    graph = FAnoGANGraph(result.nets.encoder, result.nets.generator, result.nets.critic, cfg.kappa)
    diff = export_and_check(graph, tmp_path / "export.onnx", data.images[:2], data.ages[:2])
    out = tmp_path / "bundle"
    written = write_model_bundle(out, tmp_path / "export.onnx", _bundle_spec(data.grid, diff), result.metrics_path)
    loaded = load_bundle(out)
    assert loaded.manifest == written.manifest
    manifest = loaded.manifest
    assert manifest.method == "f-anogan-3d" and manifest.input.shape == [1, 16, 16, 16]
    assert manifest.calibration.reference_scores == [0.1, 0.2, 0.3]
    assert set(manifest.files) == {"model.onnx", "training_metrics.csv"}
    assert manifest.parity["max_abs_diff"] == diff
    assert json.loads((out / "manifest.json").read_text())["training"]["torch"] == torch.__version__

    model = out / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(out)


def test_batch_norm_recalibration_makes_eval_mode_match_the_training_set(cpu) -> None:
    from headscreen.model_training.train_vae import recalibrate_batch_norm

    data = smooth_volumes(12, (8, 8, 8), seed=9)
    model = VAE3D((8, 8, 8), VaePreset(latent=4, channels=(4,), age_hidden=4), "vae_ap").eval()
    norm = model.age_head[0]
    norm.running_mean.fill_(100.0)  # stale statistics, as during training
    recalibrate_batch_norm(model, data, 4, cpu)
    with torch.no_grad():
        h = model.down(model._pad(torch.from_numpy(data.images).unsqueeze(1)))
        features = torch.cat([h.flatten(1), h.mean(dim=(2, 3, 4))], dim=1)
    # The mean of three equal-sized batch means is the whole set's mean.
    assert torch.allclose(norm.running_mean, features.mean(0), atol=1e-5)
    assert norm.momentum == 0.1 and not model.training


def test_progress_bars_stay_out_of_a_log_file(tmp_path: Path) -> None:
    """Asked for, the cohort's and the trainers' bars are drawn on a terminal only
    (test_train_floor.py shows one there): stderr in a file gets nothing from them."""
    code = ("from headscreen.model_training.cohort import _prepare_all\n"
            "from headscreen.model_training.runtime import stage_bar\n"
            "_prepare_all([], {}, None, 'cohort', True, None)\n"
            "with stage_bar(3, 'vae', True) as bar:\n"
            "    bar.update(3)\n")
    log = tmp_path / "stderr.log"
    with log.open("wb") as handle:
        subprocess.run([sys.executable, "-c", code], stderr=handle, check=True, timeout=300)
    assert log.read_bytes() == b""


def test_an_age_head_refit_learns_age_and_leaves_the_rest_of_the_network_alone() -> None:
    from headscreen.model_training.age_refit import refit_age_head

    rng = np.random.default_rng(4)

    def heads(n: int) -> Samples:
        # Age shows as the share of dark voxels, as atrophy turns tissue to CSF.
        ages = rng.uniform(20, 85, n).astype(np.float32)
        images = np.where(rng.uniform(0, 1, (n, 8, 8, 8)) < (ages[:, None, None, None] / 100.0), -0.8, 0.6)
        return Samples((images + rng.normal(0, 0.05, images.shape)).astype(np.float32), ages)

    torch.manual_seed(0)
    model = VAE3D((8, 8, 8), VaePreset(latent=4, channels=(4, 8), age_hidden=8), "vae_ap").eval()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("age_head.")}
    train, val = heads(96), heads(24)
    probe = torch.from_numpy(val.images[:4, None])
    with torch.no_grad():
        mu, logvar, _ = model.encode(probe)
        recon = model(probe, sample=False).recon

    fit = refit_age_head(model, train, val, seed=0, epochs=60, weight_decay=1e-3)

    assert fit.val_mae < 0.5 * fit.val_mae_before and fit.val_mae < 10.0
    assert fit.n_heads == 96 and 1 <= fit.best_epoch <= 60 and fit.train_mae < fit.val_mae_before
    # The kept head is the one with that validation MAE, and nothing else moved.
    with torch.no_grad():
        predicted = model.encode(torch.from_numpy(val.images[:, None]))[2]
        assert abs(float((predicted - torch.from_numpy(val.ages)).abs().mean()) - fit.val_mae) < 1e-4
        assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if k in frozen)
        again_mu, again_logvar, _ = model.encode(probe)
        assert torch.equal(again_mu, mu) and torch.equal(again_logvar, logvar)
        assert torch.equal(model(probe, sample=False).recon, recon)
    assert not model.training
    with pytest.raises(ValueError, match="no age head"):
        refit_age_head(VAE3D((8, 8, 8), VaePreset(latent=4, channels=(4,), age_hidden=4), "vae"), train, val)


def test_a_site_age_offset_is_the_median_gap_of_its_training_heads_and_moves_only_the_age() -> None:
    from headscreen.model_training.age_refit import correct_age_offset

    rng = np.random.default_rng(5)
    torch.manual_seed(1)
    model = VAE3D((8, 8, 8), VaePreset(latent=4, channels=(4, 8), age_hidden=8), "vae_ap").eval()
    untouched = {k: v.clone() for k, v in model.state_dict().items() if k != "age_head.3.bias"}

    def heads(n: int) -> Samples:
        return Samples(rng.uniform(-1, 1, (n, 8, 8, 8)).astype(np.float32), rng.uniform(20, 85, n).astype(np.float32))

    splits = {"train": heads(9), "val": heads(4), "test": heads(3)}
    splits["train"].ages[0] = 900.0  # a mistyped age does not move the median
    x = {name: torch.from_numpy(samples.images[:, None]) for name, samples in splits.items()}
    with torch.no_grad():
        predicted = {name: model.encode(v)[2].numpy().astype(np.float64) for name, v in x.items()}
        recon = model(x["val"], sample=False).recon

    fit = correct_age_offset(model, splits)

    gaps = predicted["train"] - splits["train"].ages
    assert fit.offset_years == pytest.approx(float(np.median(gaps)), abs=1e-6)
    assert fit.n_train == 9 and set(fit.before) == set(fit.after) == {"train", "val", "test"}
    with torch.no_grad():
        for name, v in x.items():
            np.testing.assert_allclose(model.encode(v)[2].numpy(), predicted[name] - fit.offset_years, atol=1e-3)
            gap = predicted[name] - fit.offset_years - splits[name].ages
            assert fit.after[name]["mae"] == pytest.approx(float(np.abs(gap).mean()), abs=2e-3)
            assert fit.before[name]["n"] == len(splits[name])
        assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items() if k in untouched)
        assert torch.equal(model(x["val"], sample=False).recon, recon)
    assert fit.val_mae == fit.after["val"]["mae"] and fit.val_mae_before == fit.before["val"]["mae"]
    low, high = fit.offset_ci95
    assert low <= fit.offset_years <= high and low < high


def test_an_age_correction_is_refused_unless_better_on_validation_and_a_site_offset_unless_told_from_zero(
        tmp_path: Path) -> None:
    from types import SimpleNamespace

    from headscreen.model_training.fit import BelowQualityFloor, age_refit_gate

    opts = SimpleNamespace(force=False, out=tmp_path / "mr-x-1.0.0")  # what the gate reads of TrainOptions
    assert age_refit_gate(5.0, 6.0, 20, opts)["passed"]
    assert age_refit_gate(5.0, 6.0, 20, opts, (0.5, 3.0))["offset_ci95"] == [0.5, 3.0]
    for args, why in [((6.0, 6.0, 20, opts), "no better"), ((5.0, 6.0, 20, opts, (-1.0, 3.0)), "holds 0"),
                      ((5.0, 6.0, 1, opts, (float("nan"), float("nan"))), "holds 0")]:
        with pytest.raises(BelowQualityFloor, match=why):
            age_refit_gate(*args)
    forced = age_refit_gate(5.0, 6.0, 20, SimpleNamespace(force=True, out=opts.out), (-1.0, 3.0))
    assert forced["forced"] and not forced["passed"]
