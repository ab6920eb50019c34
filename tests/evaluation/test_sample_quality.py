"""The sample-quality yardstick on real brain slices: the two-sample test must call disjoint real sets alike and
blurred or noised real slices different, the same number every call, and refuse bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae_medical.evaluation.image_statistics import (
    STATISTIC_NAMES,
    image_statistics,
    logistic_c2st,
    statistics_comparison,
)
from vqvae_medical.evaluation.sample_quality import (
    C2ST_TESTS,
    blur_images,
    c2st_accuracy,
    c2st_classifier,
    ms_ssim_diversity,
    sample_quality,
    stats_c2st_accuracy,
)

N = 64  # images per set: the minimum the test accepts, to keep this file fast (default settings otherwise)
# With 64 per set the test has less power than with 128 (docs/benchmarks.md, "Sample-quality yardstick": blur
# sigma 1 scores 0.75 at 64 per set), so the degradations here are stronger than the ones benchmarked at 128.
BLUR_SIGMA = 2.0  # pixels of the 208 x 176 slice
NOISE_STD = 0.1  # intensity, images in [0, 1]


@pytest.fixture(scope="module")
def slices(brain_dir) -> torch.Tensor:
    """2 * N real brain slices [2N, 1, 208, 176] in [0, 1], drawn with a fixed seed from the test folders."""
    files = sorted((brain_dir / "Test").glob("*/*.jpg"))
    if len(files) < 2 * N:
        pytest.skip(f"{brain_dir} holds {len(files)} test slices, {2 * N} are needed")
    pick = np.random.default_rng(0).permutation(len(files))[: 2 * N]
    arrays = [np.asarray(Image.open(files[i]).convert("L"), dtype=np.float32) / 255.0 for i in pick]
    return torch.from_numpy(np.stack(arrays))[:, None]


def test_disjoint_real_sets_are_indistinguishable(slices):
    assert c2st_accuracy(slices[:N], slices[N : 2 * N], seed=0) <= 0.65


def test_same_inputs_same_number(slices):
    a, b = slices[:N], blur_images(slices[N : 2 * N], 1.0)
    first = c2st_accuracy(a, b, seed=0, epochs=2)
    torch.manual_seed(123)  # the caller's random state must not matter
    torch.rand(7)
    assert c2st_accuracy(a, b, seed=0, epochs=2) == first


KNOWN_COLLAPSE = (
    "known defect, to fix: with this noise draw the score is 115/128 = 0.898 at noise std 0.1 AND 0.2 (another "
    "draw scores 1.0): the 13 errors are one class of one held-out fold, i.e. one fold's classifier predicts a "
    "single class (suspected BatchNorm train/eval mismatch or too few updates at 64 per set)"
)


@pytest.mark.parametrize(
    "kind", ["blurred", pytest.param("noised", marks=pytest.mark.xfail(strict=True, reason=KNOWN_COLLAPSE))]
)
def test_degraded_real_slices_are_told_apart(slices, kind):
    a, b = slices[:N], slices[N : 2 * N]
    if kind == "blurred":
        fake = blur_images(b, BLUR_SIGMA)
    else:
        noise = torch.randn(b.shape, generator=torch.Generator().manual_seed(1))
        fake = (b + NOISE_STD * noise).clamp(0, 1)
    assert c2st_accuracy(a, fake, seed=0) >= 0.9


def test_ms_ssim_diversity_orders_sets(slices):
    real = ms_ssim_diversity(slices[:8])
    same = ms_ssim_diversity(slices[:1].expand(8, -1, -1, -1).contiguous())
    assert same == pytest.approx(1.0, abs=1e-4)
    assert 0.0 < real < 0.9
    # a seeded subset of the images: the same pairs (and number) for the same seed
    assert ms_ssim_diversity(slices[:12], max_images=5, seed=3) == ms_ssim_diversity(slices[:12], max_images=5, seed=3)


def test_input_validation(slices):
    a = slices[:N]
    with pytest.raises(ValueError, match="at least 64"):
        c2st_accuracy(a[:63], a[:63])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        c2st_accuracy(a, a * 255)
    with pytest.raises(ValueError, match="differ in shape"):
        c2st_accuracy(a, a[..., :100])
    with pytest.raises(ValueError, match="NaN"):
        c2st_accuracy(a, torch.full_like(a, float("nan")))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        c2st_accuracy(a[:, 0], a[:, 0])
    with pytest.raises(ValueError, match="n_folds"):
        c2st_accuracy(a, a, n_folds=1)
    with pytest.raises(ValueError, match="two images"):
        ms_ssim_diversity(a[:1])
    with pytest.raises(ValueError, match="power check"):
        sample_quality(a[:100], a[:100])
    with pytest.raises(ValueError, match="spatial_dims"):
        c2st_classifier(1, 1)


def test_classifier_takes_3d_volumes():
    net = c2st_classifier(3, 2)
    assert net(torch.rand(2, 2, 16, 16, 16)).shape == (2, 1)


def test_sample_quality_keys(slices):
    real, gen = slices[:N], slices[N : 2 * N]
    out = sample_quality(real, gen, power_check=False, max_diversity_images=8, n_folds=2, epochs=1)
    assert set(out) == {
        "c2st_accuracy",
        "c2st_power_blurred_real",
        "c2st_strictest",
        "c2st_strictest_test",
        "ms_ssim_diversity_samples",
        "ms_ssim_diversity_real",
        "n_real",
        "n_generated",
        "c2st_n_per_set",
    }
    assert out["c2st_power_blurred_real"] is None
    assert (out["n_real"], out["n_generated"], out["c2st_n_per_set"]) == (N, N, N)
    assert out["c2st_accuracy"] == c2st_accuracy(real, gen, n_folds=2, epochs=1, seed=0)  # the test's own number
    assert out["c2st_strictest"] == out["c2st_accuracy"] and out["c2st_strictest_test"] == "downsampled"


def _speckled(images: torch.Tensor, share: float = 0.16) -> torch.Tensor:
    """A ``share`` of the background pixels (below 0.01) set to uniform values in [0.01, 0.06]: the speckle of
    the latent diffusion samples of issue 30 (19.6 % of background pixels above 0.01 against 3.5 %)."""
    g = torch.Generator().manual_seed(2)
    hit = (torch.rand(images.shape, generator=g) < share) & (images < 0.01)
    return torch.where(hit, 0.01 + 0.05 * torch.rand(images.shape, generator=g), images)


def test_statistics_test_sees_speckle_blur_and_less_variation(slices):
    """The per-image statistics test: disjoint real sets alike; speckled background, a 1-pixel blur and images
    whose brightness varies 5x less told apart (the 64 x 64 CNN scored such speckle near chance, issue 30)."""
    a, b = slices[:N], slices[N : 2 * N]
    real = image_statistics(a)
    means = b.mean(dim=(1, 2, 3), keepdim=True)
    narrow = (b * (means.mean() + (means - means.mean()) / 5) / means).clamp(0, 1)
    scores = {
        name: logistic_c2st(real, image_statistics(x), seed=0)
        for name, x in {"real": b, "speckle": _speckled(b), "blur": blur_images(b, 1.0), "narrow": narrow}.items()
    }
    assert scores["real"] <= 0.65
    assert scores["speckle"] >= 0.9 and scores["blur"] >= 0.9
    assert scores["narrow"] >= 0.75
    # the wrapper on images: the same number as on their statistics, every call
    assert stats_c2st_accuracy(a, b, seed=0) == scores["real"]
    with pytest.raises(ValueError, match="at least 64"):
        stats_c2st_accuracy(a[:63], b[:63])


def test_image_statistics_measure_what_they_name(slices):
    a = slices[:16]
    stats = image_statistics(a)
    assert stats.shape == (16, len(STATISTIC_NAMES))
    col = {name: stats[:, j] for j, name in enumerate(STATISTIC_NAMES)}
    assert ((col["foreground_fraction"] > 0.2) & (col["foreground_fraction"] < 0.9)).all()
    speckled = image_statistics(_speckled(a))[:, STATISTIC_NAMES.index("background_speckle_share")]
    assert (speckled > col["background_speckle_share"] + 0.1).all()
    blurred = image_statistics(blur_images(a, 1.0))
    for sigma in (0.7, 1.4):
        j = STATISTIC_NAMES.index(f"foreground_log_sigma{sigma}")
        assert (blurred[:, j] < stats[:, j]).all()
    # the spread between images: a set of one image repeated has none
    comparison = statistics_comparison(stats, image_statistics(a[:1].expand(16, -1, -1, -1).contiguous()))
    assert comparison["foreground_mean"]["spread_ratio"] == pytest.approx(0.0, abs=1e-9)
    assert image_statistics(torch.rand(2, 1, 12, 12, 12)).shape == (2, len(STATISTIC_NAMES))


def test_every_test_reported_and_the_strictest_named(slices):
    a, b = slices[:N], _speckled(slices[N : 2 * N])
    fast = {"epochs": 1, "n_folds": 2, "channels": (4, 8)}
    out = sample_quality(
        a,
        b,
        power_check=False,
        max_diversity_images=4,
        tests=("downsampled", "full", "stats"),
        test_overrides={"downsampled": {**fast, "image_size": 16}, "full": {**fast, "crop_size": 24}},
    )
    accuracies = {t: out[f"{p}_accuracy"] for t, p in C2ST_TESTS.items()}
    # each test's own number, with its own settings (the statistics test ignores the CNN's)
    assert accuracies["downsampled"] == c2st_accuracy(a, b, **fast, image_size=16)
    assert accuracies["full"] == c2st_accuracy(a, b, **fast, crop_size=24, image_size=None)
    assert accuracies["stats"] == stats_c2st_accuracy(a, b)
    assert out["c2st_strictest"] == max(accuracies.values()) >= 0.9  # the statistics test sees the speckle
    assert accuracies[out["c2st_strictest_test"]] == out["c2st_strictest"]
    assert out["image_statistics"]["background_speckle_share"]["effect_sd"] > 3
    # speckled real slices vary between images as much as the real ones do
    assert 0.5 < out["image_statistics_spread_ratio_median"] < 2.0
    with pytest.raises(ValueError, match="crop_size"):
        c2st_accuracy(a, b, crop_size=4)
