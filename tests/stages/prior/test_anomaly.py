"""Anomaly maps from the prior (``configs/anomaly.json``): a tiny VQ-VAE and a tiny transformer prior trained here on
real brain slices, a lesion inserted into a held-out slice, calibration, the bundle command and bad input."""

from __future__ import annotations

import csv
import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bundle_runner import TINY_VQVAE2_2D, run_bundle, run_bundle_in_process
from PIL import Image
from scipy import ndimage
from tiny import vqvae_settings

from vqvae_medical.data import image_transforms_2d
from vqvae_medical.data.checks import DataError
from vqvae_medical.networks import VQVAE, VQVAE2, GatedPixelCNN, TransformerPrior
from vqvae_medical.stages.frozen import FrozenAutoencoder, load_autoencoder
from vqvae_medical.stages.prior.anomaly import anomaly_maps, code_nll, heal_codes, resample_masks
from vqvae_medical.stages.prior.anomaly_calibration import (
    CALIBRATION_FILE,
    SCORE_CALIBRATION_FILE,
    calibrate,
    load_calibration,
    load_score_calibration,
)
from vqvae_medical.stages.prior.anomaly_run import anomaly_inputs, run_anomaly, to_input_space
from vqvae_medical.stages.prior.hierarchical import HierarchicalPrior
from vqvae_medical.stages.prior.network import PriorNetwork, load_prior
from vqvae_medical.training.runtime import SettingError

BUNDLE = "pixelcnn_prior"
SIZE = [64, 64]  # centre crops of the 208 x 176 slices -> 16 x 16 code maps
VQ = {**vqvae_settings([16, 32], [8, 16], 32), "in_channels": 1}
PRIOR = {"num_embeddings": 32, "channels": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 256}

#: the tests that use ``models`` run on one pytest-xdist worker: the models are trained once
MODELS = pytest.mark.xdist_group("anomaly_models")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module: tiny models and the cached healing are many small steps, which more
    threads only slow down on a shared CPU (the thread count is restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_prior() -> PriorNetwork:
    """The network that PRIOR builds from the bundle's network_def."""
    return PriorNetwork(TransformerPrior(2, 32, max_seq_len=256, channels=32, num_layers=2, num_heads=2))


@pytest.fixture(scope="module")
def models(tmp_path_factory, brain_files, real_folder):
    """40 real NonDemented slices (64 x 64 centre crops, split 32 / 4 / 4); a tiny vqvae and a tiny transformer
    prior trained 3 epochs each on them through the bundles' train.json, in this process: a stage-1 folder and a
    prior checkpoint as a user has them (their quality is not what these tests check)."""
    data = real_folder(brain_files(40), tmp_path_factory.mktemp("slices"), link=True)
    vq_out = tmp_path_factory.mktemp("vq")
    split = {"val_fraction": 0.1, "test_fraction": 0.1, "data_layout": "folder", "spatial_size": SIZE}
    run_bundle_in_process(
        "vqvae",
        ["train.json"],
        {**VQ, **split, "dataset_dir": data, "output_dir": vq_out, "batch_size": 8, "max_epochs": 3},
    )
    prior_out = tmp_path_factory.mktemp("prior")
    run_bundle_in_process(
        BUNDLE,
        ["train.json"],
        {
            **PRIOR,
            "autoencoder_dir": vq_out,
            "output_dir": prior_out,
            "batch_size": 8,
            "max_epochs": 3,
            "sample_interval": 0,
            "embedding_dropout": 0.0,
            "learning_rate": 3e-3,
        },
    )
    ckpt = prior_out / "models" / "model.pt"
    return {"data": data, "vq": vq_out, "prior": prior_out, "ckpt": ckpt}


def _loaded(models):
    return load_autoencoder(models["vq"]), load_prior(tiny_prior(), models["ckpt"])


def insert_lesion(image: np.ndarray, radius: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc (1.0) centred on the darkest point of the brain (smoothed) at least ``radius + 2`` px inside its
    outline: a ventricle or sulcus, where nothing bright belongs."""
    brain = ndimage.binary_fill_holes(ndimage.gaussian_filter(image, 1.0) > 0.1)
    inside = ndimage.distance_transform_edt(brain) > radius + 2
    smooth = np.where(inside, ndimage.gaussian_filter(image, 2.0), np.inf)
    cy, cx = np.unravel_index(np.argmin(smooth), image.shape)
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    out = image.copy()
    out[mask] = 1.0
    return out, mask


@pytest.fixture(scope="module")
def direct(brain_files):
    """A tiny VQ-VAE (factor 4, 32 codes) and a tiny transformer prior trained in this process on 120 real slices
    (64 x 64 centre crops; 200 Adam steps each, about 20 CPU-s together), 8 held-out healthy slices for the NLL
    threshold and 4 more for the lesions."""
    return _train_direct(brain_files(132))


def _train_direct(files: list) -> dict:
    torch.manual_seed(0)
    transform = image_transforms_2d(spatial_size=SIZE)
    x = torch.stack([transform({"image": str(f)})["image"].as_tensor() for f in files]).float()
    train, held_out, lesion_slices = x[:120], x[120:128], x[128:]
    vqvae = VQVAE(2, 1, channels=(16, 32), res_channels=(8, 16), num_res_units=1, num_embeddings=32, embedding_dim=8)
    optimizer = torch.optim.Adam(vqvae.parameters(), 2e-3)
    for _ in range(200):
        batch = train[torch.randint(0, len(train), (16,))]
        out = vqvae(batch)
        loss = F.l1_loss(out[0], batch) + out[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    autoencoder = FrozenAutoencoder(vqvae)
    codes = autoencoder.encode_to_indices(train)
    network = tiny_prior()
    optimizer = torch.optim.Adam(network.parameters(), 3e-3)
    for _ in range(200):
        batch = codes[torch.randint(0, len(codes), (16,))]
        loss = F.cross_entropy(network.model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()
    nll = code_nll(network, autoencoder.encode_to_indices(held_out))[0]
    threshold = float(torch.quantile(nll.flatten().double(), 0.99))  # what the calibration computes
    return {"autoencoder": autoencoder, "network": network, "threshold": threshold, "slices": lesion_slices}


def test_map_peaks_inside_an_inserted_lesion(direct):
    """On held-out real slices with an inserted lesion, the map's mean inside the lesion is far above its mean
    outside, and its largest value lies in the lesion (or its 2-pixel rim); the lesion's codes are resampled more
    than the clean slice's and its image score is higher."""
    peaks_inside = 0
    for image in direct["slices"][:, 0].numpy():
        lesioned, mask = insert_lesion(image)
        result, clean = (
            anomaly_maps(
                direct["autoencoder"],
                direct["network"],
                torch.from_numpy(x)[None, None],
                [direct["threshold"]],
                generator=torch.Generator().manual_seed(0),
            )
            for x in (lesioned, image)
        )
        amap = result.maps[0, 0].numpy()
        assert amap.shape == tuple(SIZE) and result.healed.shape == (1, 1, *SIZE)
        assert amap[mask].mean() > 5 * amap[~mask].mean()
        peak = np.unravel_index(np.argmax(amap), amap.shape)
        peaks_inside += int(ndimage.binary_dilation(mask, iterations=2)[peak])
        assert 0 <= float(clean.resampled[0]) < float(result.resampled[0]) < 0.5
        assert float(result.scores["map_top"][0]) > float(clean.scores["map_top"][0])
    assert peaks_inside >= 3


@MODELS
def test_healing_keeps_unmasked_codes_and_redraws_masked_ones(models):
    autoencoder, network = _loaded(models)
    item = autoencoder.datalist(models["prior"] / "cache")["test"][0]
    codes = autoencoder.encode_to_indices(autoencoder.transforms()(dict(item))["image"][None])
    codes = codes.repeat(4, 1, 1)
    mask = torch.zeros_like(codes, dtype=torch.bool)
    mask[:, 5:9, 3:12] = True
    (healed,) = heal_codes(network, codes, (mask,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(healed[~mask], codes[~mask])
    assert not torch.equal(healed[mask], codes[mask])  # 144 codes redrawn at temperature 1: some change
    # the same seed gives the same healing
    (again,) = heal_codes(network, codes, (mask,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(healed, again)


@MODELS
def test_calibration_is_the_quantile_of_heldout_code_nll(models, tmp_path):
    autoencoder, network = _loaded(models)
    path = tmp_path / CALIBRATION_FILE
    calibration = load_calibration(
        path, autoencoder, network, models["ckpt"], quantile=0.95, cache_dir=models["prior"] / "cache"
    )
    items = autoencoder.datalist(models["prior"] / "cache")["validation"]
    transform = autoencoder.transforms()
    images = torch.stack([transform(dict(i))["image"].as_tensor() for i in items])
    codes = autoencoder.encode_to_indices(images)
    with torch.no_grad():
        nll = F.cross_entropy(network.model(codes), codes, reduction="none")
    expected = float(torch.quantile(nll.flatten().double(), 0.95))
    assert calibration["thresholds_nats"][0] == pytest.approx(expected, rel=1e-5)
    assert calibration["n_images"] == len(items) and calibration["n_codes"] == [codes.numel()]
    assert json.loads(path.read_text())["thresholds_nats"] == calibration["thresholds_nats"]
    # stored: read back as long as checkpoint, autoencoder and settings are the same; another quantile recomputes
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "thresholds_nats": [123.0]}))
    assert load_calibration(path, autoencoder, network, models["ckpt"], quantile=0.95)["thresholds_nats"] == [123.0]
    again = load_calibration(
        path, autoencoder, network, models["ckpt"], quantile=0.5, cache_dir=models["prior"] / "cache"
    )
    assert again["thresholds_nats"][0] < expected
    # a stored calibration of this checkpoint made with other stage-1 weights: the prior belongs to those
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "autoencoder": "0" * 64}))
    with pytest.raises(SettingError, match="is a prior over the codes of another autoencoder than autoencoder_dir"):
        load_calibration(path, autoencoder, network, models["ckpt"], quantile=0.5)


@MODELS
def test_a_prior_that_does_not_model_these_codes_is_refused(models, tmp_path):
    """An untrained prior (as a prior of another autoencoder's codes) scores the held-out codes no better than their
    histogram: the calibration stops with one message naming the autoencoder folder."""
    autoencoder, _ = _loaded(models)
    torch.manual_seed(0)
    untrained = tiny_prior().eval()
    items = autoencoder.datalist(models["prior"] / "cache")["validation"]
    with pytest.raises(SettingError, match="the prior does not model the codes of autoencoder_dir"):
        calibrate(autoencoder, untrained, items)


@MODELS
def test_inputs_of_another_size_channel_count_or_dimension_are_one_line(models, tmp_path, brain_files, ixi_files):
    autoencoder, _ = _loaded(models)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found"):
        anomaly_inputs(empty, autoencoder)
    rgb = tmp_path / "rgb" / "photo.png"
    rgb.parent.mkdir()
    Image.open(brain_files(1)[0]).convert("RGB").save(rgb)
    with pytest.raises(DataError, match=r"photo.png: has 3 channel\(s\), but the stage-1 model of .* 1-channel"):
        anomaly_inputs(rgb.parent, autoencoder)
    volume = ixi_files(1)[0]
    with pytest.raises(DataError, match="is a 3D volume .* anomaly maps are 2D only"):
        anomaly_inputs(volume, autoencoder)
    # a stage-1 model that keeps each image's size (no spatial_size): another size is refused, naming the file
    autoencoder.record = {
        **autoencoder.record,
        "image_size": [64, 64],
        "preprocessing": {**autoencoder.record["preprocessing"], "spatial_size": None},
    }
    slice_path = brain_files(1)[0]
    with pytest.raises(DataError, match=rf"{re.escape(slice_path.name)}: has size \[208, 176\], .* on \[64, 64\]"):
        anomaly_inputs(slice_path, autoencoder)


@MODELS
def test_bundle_writes_maps_scores_and_figure(models, tmp_path, brain_files, ixi_files):
    """``configs/inference.json`` + ``configs/anomaly.json`` as a user runs them: one map and healed image per input
    in the input's space (sub-folders kept, same-named files kept apart; PNG at the input's size, NIfTI with the
    input's affine), one row of scores.csv each with the image score calibrated on the held-out healthy images, a
    figure; then the same prior with another stage-1 folder stops with one line."""
    inputs = tmp_path / "inputs"
    (inputs / "a").mkdir(parents=True)
    (inputs / "b").mkdir()
    files = brain_files(3)
    shutil.copy(files[0], inputs / "a" / "x.jpg")
    Image.open(files[1]).save(inputs / "a" / "x.png")
    shutil.copy(files[2], inputs / "b" / "x.jpg")
    # a 2D NIfTI slice of a real IXI volume (120 x 120, 2 mm, oblique-free but shifted affine)
    volume = nib.load(ixi_files(1)[0])
    slice_affine = volume.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 45], [0, 0, 0, 1]], dtype=float)
    nib.save(
        nib.Nifti1Image(np.asarray(volume.dataobj, dtype=np.float32)[:, :, 45], slice_affine), inputs / "b" / "s.nii.gz"
    )
    out = tmp_path / "run"
    common = {**PRIOR, "autoencoder_dir": models["vq"], "ckpt_path": models["ckpt"], "output_dir": out}
    run_bundle(BUNDLE, ["inference.json", "anomaly.json"], {**common, "input_dir": inputs, "num_figure": 2}, threads=1)
    with open(out / "anomaly" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    names = sorted(r["map"] for r in rows)
    assert names == ["a/x_jpg_anomaly.png", "a/x_png_anomaly.png", "b/s_anomaly.nii.gz", "b/x_anomaly.png"]
    healthy = json.loads((models["ckpt"].parent / SCORE_CALIBRATION_FILE).read_text())["scores"]["map_top"]
    for r in rows:
        if r["map"].endswith(".png"):  # the stage-1 model crops to 64 x 64: the map comes back at 208 x 176
            assert Image.open(out / "anomaly" / r["map"]).size == Image.open(r["path"]).size == (176, 208)
            assert Image.open(out / "anomaly" / r["healed"]).size == (176, 208)
        assert float(r["score"]) == float(r["score_map_top"]) and 0 <= float(r["resampled"]) < 1
        assert r["quantile"] == "0.99" and r["image_score"] == "map_top" and r["score_quantile"] == "0.95"
        # the image score is placed among the held-out healthy images' scores
        score = float(r["score"])
        assert float(r["image_threshold"]) == pytest.approx(float(np.quantile(healthy, 0.95)))
        assert r["anomalous"] == str(score > float(r["image_threshold"]))
        below = sum(h < score for h in healthy) + 0.5 * sum(h == score for h in healthy)
        assert float(r["healthy_percentile"]) == pytest.approx(below / len(healthy))
    # the NIfTI input: map and healed slice on the input's grid, with its affine, healed in its intensity range
    source = nib.load(inputs / "b" / "s.nii.gz")
    for kind in ("anomaly", "healed"):
        written = nib.load(out / "anomaly" / "b" / f"s_{kind}.nii.gz")
        assert written.shape == source.shape == (120, 120)
        np.testing.assert_allclose(written.affine, source.affine)
    healed = np.asarray(nib.load(out / "anomaly" / "b" / "s_healed.nii.gz").dataobj)
    assert float(healed.max()) > 2.0 and float(healed.max()) <= float(np.asarray(source.dataobj).max()) + 1e-3
    assert Image.open(out / "anomaly" / "figure.png").size[1] > 200
    assert (models["ckpt"].parent / CALIBRATION_FILE).is_file()

    # the same prior with another stage-1 model (the VQ-VAE trained one epoch more): one line, no traceback
    other = tmp_path / "vq_other"
    shutil.copytree(models["vq"], other)
    split = {"val_fraction": 0.1, "test_fraction": 0.1, "data_layout": "folder", "spatial_size": SIZE}
    run_bundle_in_process(
        "vqvae",
        ["train.json"],
        {**VQ, **split, "dataset_dir": models["data"], "output_dir": other, "batch_size": 8, "max_epochs": 4},
    )
    proc = run_bundle(
        BUNDLE,
        ["inference.json", "anomaly.json"],
        {**common, "autoencoder_dir": other, "input_dir": inputs},
        threads=1,
        expect_ok=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    # refused by the prior's record of its autoencoder (models/provenance.json) when the extra epoch changed the
    # VQ-VAE, else (same weights, another folder) by the calibration's record of the autoencoder
    by_calibration = last.startswith("ERROR (SettingError): ckpt_path ") and "another autoencoder than" in last
    by_provenance = last.startswith("ERROR (AutoencoderDirError): ") and f"on the autoencoder {models['vq']}" in last
    assert by_calibration or by_provenance, last

    # an empty input folder: one line naming it
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_bundle(
        BUNDLE, ["inference.json", "anomaly.json"], {**common, "input_dir": empty}, threads=1, expect_ok=False
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"ERROR (DataError): {empty}: no images found")


@MODELS
def test_an_image_of_another_modality_is_one_line(models, tmp_path, brain_files, isic_jpg):
    """A grey ISIC skin photo has the brain slices' channel count but not their modality: far more of its codes are
    unlikely under the prior than of a brain slice's, so the run stops naming it; with skip_bad it is skipped and the
    brain slice (written before it) keeps its map and row."""
    autoencoder, network = _loaded(models)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(brain_files(1)[0], folder / "brain.jpg")
    Image.open(isic_jpg).convert("L").save(folder / "skin.png")
    items = anomaly_inputs(folder, autoencoder)  # the file checks pass: one channel, any size (spatial_size is set)
    calibration = load_calibration(
        tmp_path / CALIBRATION_FILE, autoencoder, network, models["ckpt"], cache_dir=models["prior"] / "cache"
    )
    # a trained prior redraws ~2% of a brain slice's codes and 28-91% of a skin photo's (docs/anomaly.md), hence
    # the default max_unlikely_share 0.25; this 3-epoch prior redraws 0.4% and ~4%: the limit is lowered to fit it
    limit = 0.02
    pattern = r"skin.png: \d+% of its codes are unlikely under the prior .* give such images, or set skip_bad_files"
    with pytest.raises(DataError, match=pattern):
        run_anomaly(autoencoder, network, items, tmp_path / "out", calibration, folder, max_unlikely_share=limit)
    csv_path = run_anomaly(autoencoder, network, items, tmp_path / "skip", calibration, folder,
                           max_unlikely_share=limit, skip_bad=True)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["map"] for r in rows] == ["brain_anomaly.png"] and float(rows[0]["resampled"]) < limit
    assert not list((tmp_path / "skip").glob("skin*"))


@MODELS
def test_image_score_is_calibrated_on_heldout_healthy_images(models, tmp_path):
    """The stored healthy scores are the image scores that anomaly_maps gives the held-out validation images with
    the calibrated thresholds and the run's settings; read back while those hold, recomputed when one changes."""
    autoencoder, network = _loaded(models)
    cache = models["prior"] / "cache"
    calibration = load_calibration(tmp_path / CALIBRATION_FILE, autoencoder, network, models["ckpt"], cache_dir=cache)
    path = tmp_path / SCORE_CALIBRATION_FILE
    stored = load_score_calibration(path, autoencoder, network, models["ckpt"], calibration, cache_dir=cache, seed=3)
    items = autoencoder.datalist(cache)["validation"]
    transform = autoencoder.transforms()
    images = torch.stack([transform(dict(i))["image"].as_tensor() for i in items])
    result = anomaly_maps(
        autoencoder, network, images, calibration["thresholds_nats"], generator=torch.Generator().manual_seed(3)
    )
    assert stored["n_images"] == len(items) and stored["thresholds_nats"] == calibration["thresholds_nats"]
    for name in ("map_top", "nll_excess"):
        assert stored["scores"][name] == pytest.approx(sorted(result.scores[name].tolist()), rel=1e-5, abs=1e-7)
    path.write_text(json.dumps({**stored, "scores": {"map_top": [9.0], "nll_excess": [9.0]}}))
    again = load_score_calibration(path, autoencoder, network, models["ckpt"], calibration, cache_dir=cache, seed=3)
    assert again["scores"]["map_top"] == [9.0]
    other = load_score_calibration(
        path, autoencoder, network, models["ckpt"], calibration, cache_dir=cache, seed=3, nll_threshold=0.0
    )  # every code resampled: another calibration
    assert other["thresholds_nats"] == [0.0] and other["scores"]["map_top"] != [9.0]
    assert min(other["scores"]["nll_excess"]) > max(stored["scores"]["nll_excess"])


def test_maps_return_to_the_input_grid(brain_files):
    """A map on the stage-1 grid comes back on the input's grid: a centre crop (``pad``) puts each map pixel back
    where it was cut from, zero elsewhere; ``resize`` resamples it to the input's size."""
    path = str(brain_files(1)[0])  # 208 x 176
    crop = image_transforms_2d(spatial_size=SIZE)
    image = crop({"image": path})["image"]
    amap = torch.zeros(1, *SIZE)
    amap[0, 10, 20] = 1.0
    for _ in range(2):  # the map, then the healed image of the same input
        back = to_input_space(crop, amap, image)
        assert back.shape == (1, 208, 176)
        assert back[0, 72 + 10, 56 + 20] == 1.0 and float(back.sum()) == 1.0
    resize = image_transforms_2d(spatial_size=SIZE, resize_mode="resize")
    image = resize({"image": path})["image"]
    amap = torch.zeros(1, *SIZE)
    amap[0, 32:, :] = 1.0  # the lower half
    back = to_input_space(resize, amap, image)
    assert back.shape == (1, 208, 176)
    assert float(back[0, 110:].min()) > 0.9 and float(back[0, :98].max()) < 0.1
    unchanged = image_transforms_2d()({"image": path})["image"]
    assert to_input_space(image_transforms_2d(), unchanged.as_tensor(), unchanged).shape == (1, 208, 176)


def test_vqvae2_top_and_bottom_both_count(brain_files):
    """VQ-VAE-2: a bottom code is resampled when its own NLL or its parent top code's NLL is above threshold; the top
    map is healed first, then the bottom map given it; codes outside the masks are kept at both levels."""
    torch.manual_seed(0)
    vqvae2 = VQVAE2(2, 1, channels=(8, 16), num_res_units=1, num_embeddings=(8, 16), embedding_dim=4).eval()
    autoencoder = FrozenAutoencoder(vqvae2)
    top = TransformerPrior(2, 8, max_seq_len=64, channels=8, num_layers=1, num_heads=2)
    bottom = GatedPixelCNN(2, 16, 8, 2, conditioning_num_embeddings=8)
    network = HierarchicalPrior(top, bottom).eval()
    image = image_transforms_2d(spatial_size=[32, 32])({"image": str(brain_files(1)[0])})["image"].as_tensor()
    codes = autoencoder.encode_to_indices(image[None])
    nll_top, nll_bottom = code_nll(network, codes)
    assert nll_top.shape == (1, 4, 4) and nll_bottom.shape == (1, 8, 8)
    thresholds = [float(nll_top.median()), float(nll_bottom.max()) + 1]  # no bottom code alone is above threshold
    mask_top, mask_bottom = resample_masks((nll_top, nll_bottom), thresholds)
    assert mask_top.any() and torch.equal(mask_bottom, mask_top.repeat_interleave(2, 1).repeat_interleave(2, 2))
    result = anomaly_maps(autoencoder, network, image[None], thresholds, generator=torch.Generator().manual_seed(0))
    assert result.maps.shape == (1, 1, 32, 32) and result.healed.shape == (1, 1, 32, 32)
    assert float(result.resampled[0]) == pytest.approx(float(mask_top.sum() + mask_bottom.sum()) / 80)
    healed_top, healed_bottom = heal_codes(network, codes, (mask_top, mask_bottom), generator=torch.Generator())
    assert torch.equal(healed_top[~mask_top], codes[0][~mask_top])
    assert torch.equal(healed_bottom[~mask_bottom], codes[1][~mask_bottom])
    # the map is zero outside the resampled region (no smoothing)
    outside = ~mask_bottom.repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert float(result.maps[0, 0][outside[0]].abs().max()) == 0.0


def test_vqvae2_bundle_calibrates_and_maps_both_levels(tmp_path, brain_files, real_folder):
    """``inference.json`` + ``vqvae2.json`` + ``anomaly.json`` on a tiny vqvae2 and its top + bottom prior trained
    here: one NLL threshold per level (each the 0.99 quantile of its own held-out codes), both in scores.csv, maps at
    the input's size."""
    data = real_folder(brain_files(24), tmp_path / "brain", link=True)
    vq, prior, out = tmp_path / "vq2", tmp_path / "prior", tmp_path / "run"
    split = {"data_layout": "folder", "val_fraction": 0.2, "test_fraction": 0.1, "spatial_size": [32, 32]}
    run_bundle_in_process("vqvae2", ["train.json"], {**TINY_VQVAE2_2D, **split, "dataset_dir": data, "output_dir": vq,
                                                      "batch_size": 4, "max_epochs": 3})
    net = {"num_embeddings": [8, 16], "channels": 8, "num_layers": 2, "num_heads": 2, "max_seq_len": 16,
           "bottom_channels": 8, "bottom_num_layers": 2}
    run_bundle(BUNDLE, ["train.json", "vqvae2.json"], {**net, "autoencoder_dir": vq, "output_dir": prior,
               "batch_size": 4, "max_epochs": 10, "sample_interval": 0, "learning_rate": 3e-3}, threads=1)
    inputs = real_folder(brain_files(26)[24:], tmp_path / "inputs")  # two slices neither model saw
    ckpt = prior / "models" / "model.pt"
    run_bundle(BUNDLE, ["inference.json", "vqvae2.json", "anomaly.json"], {**net, "autoencoder_dir": vq,
               "ckpt_path": ckpt, "output_dir": out, "input_dir": inputs, "num_figure": 1}, threads=1)
    calibration = json.loads((ckpt.parent / CALIBRATION_FILE).read_text())
    assert len(calibration["thresholds_nats"]) == 2 and calibration["n_codes"][1] == 4 * calibration["n_codes"][0]
    with open(out / "anomaly" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for r in rows:
        assert [float(t) for t in r["nll_threshold"].split(";")] == pytest.approx(calibration["thresholds_nats"],
                                                                                  rel=1e-3)
        assert Image.open(out / "anomaly" / r["map"]).size == (176, 208)
