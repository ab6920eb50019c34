"""The sample-quality report shared by the generative bundles' evaluate configs (``evaluation.sample_report``):
the class mix of the samples, the rules that skip the two-sample test and its power check, on real brain slices."""

from __future__ import annotations

import pytest
import torch

from vqvae_medical.data import image_transforms_2d
from vqvae_medical.evaluation.sample_quality import (
    DEFAULT_TESTS,
    MIN_C2ST_IMAGES,
    c2st_accuracy,
    c2st_test_settings,
    stats_c2st_accuracy,
)
from vqvae_medical.evaluation.sample_report import (
    load_real_images,
    real_image_count,
    sample_classes,
    score_samples,
    split_c2st_settings,
)

FAST_C2ST = {"image_size": 16, "epochs": 1, "n_folds": 2, "channels": [4, 8]}


@pytest.fixture(scope="module")
def slices(brain_files):
    """70 real brain slices, centre 32 x 32 crops in [0, 1], drawn in a seeded order."""
    items = [{"image": str(f)} for f in brain_files(70)]
    return load_real_images(items, image_transforms_2d(spatial_size=32), 70, seed=0)


def test_load_real_images_is_seeded(brain_files):
    items = [{"image": str(f)} for f in brain_files(6)]
    transform = image_transforms_2d(spatial_size=16)
    a, b = (load_real_images(items, transform, 3, seed=s) for s in (0, 0))
    assert a.shape == (3, 1, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, load_real_images(items, transform, 3, seed=1))
    with pytest.raises(ValueError, match="cannot draw 7 real images"):
        load_real_images(items, transform, 7)


def test_real_image_count():
    assert real_image_count(500, 128) == 128 and real_image_count(500, 16) == 2 * MIN_C2ST_IMAGES
    assert real_image_count(500, 300) == 300 and real_image_count(3, 128) == 3


def test_sample_classes_follow_the_test_labels():
    # 3 : 1 over 6 samples: quotas 4.5 and 1.5, the remaining sample to the lower class on the tie
    assert sample_classes([0, 0, 0, 1], 6, 2).tolist() == [0, 0, 0, 0, 0, 1]
    # 2 : 1 over 4 samples (labels outside [0, 3) ignored): quotas 2.67 and 1.33, the remainder to the larger
    assert sample_classes([1, 1, 2, None, -1], 4, 3).tolist() == [1, 1, 1, 2]
    assert torch.bincount(sample_classes([1, 1, 2, None, -1], 6, 3), minlength=3).tolist() == [0, 4, 2]
    # no label in range: the classes equally
    assert sample_classes([None, -1, 7], 5, 3).tolist() == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="num_classes"):
        sample_classes([0], 4, 0)


def test_too_few_images_skip_the_two_sample_test(slices, caplog):
    real, generated = slices[:10], slices[10:16]
    with caplog.at_level("WARNING"):
        metrics = score_samples(real, generated, power_check=True)
    assert metrics["c2st_accuracy"] is None and metrics["c2st_power_blurred_real"] is None
    for key in ("c2st_stats_accuracy", "c2st_stats_power_blurred_real", "c2st_strictest"):
        assert key in metrics and metrics[key] is None
    assert metrics["c2st_n_per_set"] is None and "got 10 real (test split) and 6 generated" in metrics["c2st_skipped"]
    assert sum("no two-sample test" in r.message for r in caplog.records) == 1
    assert (metrics["n_real"], metrics["n_generated"]) == (10, 6)
    assert 0.0 < metrics["ms_ssim_diversity_samples"] < 1.0 and 0.0 < metrics["ms_ssim_diversity_real"] < 1.0
    ratio = metrics["ms_ssim_diversity_samples"] / metrics["ms_ssim_diversity_real"]
    assert metrics["ms_ssim_diversity_ratio"] == pytest.approx(ratio)
    # identical sets: the same diversity, ratio 1
    same = score_samples(real, real.clone(), power_check=False)
    assert same["ms_ssim_diversity_ratio"] == pytest.approx(1.0)


def test_power_check_needs_128_real_images(slices, caplog):
    real, generated = slices[:MIN_C2ST_IMAGES], slices.flip(-1)[-MIN_C2ST_IMAGES:]
    with caplog.at_level("WARNING"):
        metrics = score_samples(real, generated, seed=0, c2st_settings=FAST_C2ST)
    assert metrics["c2st_n_per_set"] == MIN_C2ST_IMAGES
    # every default test is run with the given settings (the CNN's for the CNN test only) and reported: each the
    # number the test gives on its own; the strictest is the highest of them
    cnn = c2st_accuracy(real, generated, seed=0, **c2st_test_settings("downsampled", FAST_C2ST))
    assert metrics["c2st_accuracy"] == cnn and metrics["c2st_stats_accuracy"] == stats_c2st_accuracy(real, generated)
    accuracies = [metrics[k] for k in ("c2st_accuracy", "c2st_stats_accuracy")]
    assert metrics["c2st_strictest"] == max(accuracies)
    assert metrics["c2st_stats_power_blurred_real"] is None and "c2st_full_accuracy" not in metrics
    # the full-resolution test when asked for by name
    full = score_samples(real, generated, power_check=False, c2st_settings={**FAST_C2ST, "tests": ["full"]})
    expected = c2st_accuracy(real, generated, seed=0, **c2st_test_settings("full", FAST_C2ST))
    assert full["c2st_full_accuracy"] == expected and full["c2st_strictest_test"] == "full"
    assert full["c2st_accuracy"] is None and "c2st_stats_accuracy" not in full
    assert "c2st_skipped" not in metrics
    assert metrics["c2st_power_blurred_real"] is None and "at least 128 real images" in metrics["c2st_power_skipped"]
    assert sum("no power check" in r.message for r in caplog.records) == 1
    # no reason when the power check was not asked for
    assert "c2st_power_skipped" not in score_samples(real, generated, power_check=False, c2st_settings=FAST_C2ST)


def test_score_samples_rejects_mismatched_or_single_images(slices):
    with pytest.raises(ValueError, match="differ in shape"):
        score_samples(slices[:4], slices[:4, :, :16, :16])
    with pytest.raises(ValueError, match="at least two real and two generated"):
        score_samples(slices[:1], slices[:4])


def test_c2st_settings_pick_the_tests_and_their_settings():
    tests, per_test = split_c2st_settings(None)
    assert tests == list(DEFAULT_TESTS) and per_test == {t: {} for t in DEFAULT_TESTS}
    # top-level settings go to both CNN tests, a test's own sub-dictionary wins, the stats test takes its own only
    tests, per_test = split_c2st_settings(
        {"tests": ["stats", "full"], "epochs": 3, "crop_size": 96, "full": {"crop_size": 64}, "stats": {"l2": 2.0}}
    )
    assert tests == ["stats", "full"]
    assert per_test == {"stats": {"l2": 2.0}, "full": {"epochs": 3, "crop_size": 64}}
    with pytest.raises(ValueError, match="unknown tests"):
        split_c2st_settings({"tests": ["fid"]})
