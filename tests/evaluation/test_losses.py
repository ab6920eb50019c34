"""The separable SSIM loss equals MONAI's ``SSIMLoss`` on real images, in value and gradient."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import SSIMLoss
from PIL import Image

from vqvae_medical.evaluation.losses import SeparableSSIMLoss


def _scaled(array: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(array, dtype=torch.float32)
    return (x - x.min()) / (x.max() - x.min())


def _compare(spatial_dims: int, target: torch.Tensor) -> None:
    torch.manual_seed(0)
    noisy = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    grads = []
    values = []
    for loss in (SeparableSSIMLoss(spatial_dims), SSIMLoss(spatial_dims, data_range=1.0)):
        prediction = noisy.clone().requires_grad_()
        value = loss(prediction, target)
        value.backward()
        values.append(value.item())
        grads.append(prediction.grad)
    assert 0.0 < values[0] < 1.0
    assert values[0] == pytest.approx(values[1], abs=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-7)


def test_matches_monai_on_rgb_photos(isic_dir):
    files = sorted((isic_dir / "images").glob("*.jpg"))[:2]
    photos = [np.asarray(Image.open(f).convert("RGB").resize((96, 96)), dtype=np.float32) for f in files]
    target = _scaled(np.stack(photos)).permute(0, 3, 1, 2).contiguous()
    _compare(2, target)


def test_matches_monai_on_a_volume(ixi_dir):
    path = sorted((ixi_dir / "t1").glob("IXI*_T1.nii.gz"))[0]
    volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)[30:62, 30:62, 30:62]
    _compare(3, _scaled(volume)[None, None])


def test_identical_images_have_zero_loss(brain_dir):
    path = sorted(brain_dir.rglob("*.jpg"))[0]
    image = _scaled(np.asarray(Image.open(path).convert("L"), dtype=np.float32))[None, None]
    assert SeparableSSIMLoss(2)(image, image).item() == pytest.approx(0.0, abs=1e-6)


def test_images_smaller_than_the_window_use_a_smaller_window():
    torch.manual_seed(0)
    target = torch.rand(2, 1, 8, 16)
    loss = SeparableSSIMLoss(2)(target.flip(-1), target)
    assert torch.isfinite(loss) and 0.0 < loss.item() < 2.0
    # same as an explicit 7-tap window (the largest odd size that fits 8)
    assert loss.item() == pytest.approx(SeparableSSIMLoss(2, win_size=7)(target.flip(-1), target).item())


@pytest.mark.parametrize(
    "kwargs, shapes, match",
    [
        ({"spatial_dims": 1}, None, "spatial_dims"),
        ({"spatial_dims": 2, "win_size": 4}, None, "win_size"),
        ({"spatial_dims": 2}, ((1, 1, 16, 16), (1, 1, 16, 17)), "same shape"),
        ({"spatial_dims": 3}, ((1, 1, 16, 16), (1, 1, 16, 16)), "spatial dims"),
    ],
)
def test_bad_arguments(kwargs, shapes, match):
    with pytest.raises(ValueError, match=match):
        loss = SeparableSSIMLoss(**kwargs)
        loss(torch.rand(shapes[0]), torch.rand(shapes[1]))


def test_separable_ssim_metric_matches_monai_per_volume(ixi_dir):
    """The 3D bundle's validation metric: MONAI's ``SSIMMetric`` values, image by image, on real IXI volumes."""
    from monai.metrics import SSIMMetric

    from vqvae_medical.evaluation.metrics import SeparableSSIMMetric

    paths = sorted((ixi_dir / "t1").glob("IXI*_T1.nii.gz"))[:2]
    target = torch.stack(
        [_scaled(np.asarray(nib.load(p).dataobj, dtype=np.float32)[20:68, 20:68, 20:60])[None] for p in paths]
    )
    torch.manual_seed(0)
    prediction = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    ours, monai = SeparableSSIMMetric(3, win_size=7), SSIMMetric(3, data_range=1.0, win_size=7)
    per_image = ours(prediction, target)
    assert per_image.shape == (2, 1)
    torch.testing.assert_close(per_image, monai(prediction, target), rtol=0, atol=2e-5)
    assert ours.aggregate().item() == pytest.approx(monai.aggregate().item(), abs=2e-5)
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ours(prediction[..., :5], target[..., :5])
