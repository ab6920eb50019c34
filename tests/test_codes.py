"""Code extraction from a VQ-VAE bundle's checkpoint: frozen autoencoder, on-disk cache, code-map dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from vqvae_medical.data import build_datalist, image_transforms_2d
from vqvae_medical.stages.frozen import load_vqvae, state_digest
from vqvae_medical.stages.prior.codes import (
    NO_LABEL,
    CodeMapDataset,
    cached_code_maps,
    code_map_dataset,
    extract_codes,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
VQ_BUNDLE = REPO_ROOT / "bundles" / "vqvae_2d"
TINY_VQ = {
    "in_channels": 3,
    "network_def#model#channels": [8, 16],
    "network_def#model#res_channels": [8, 8],
    "network_def#model#num_res_units": 1,
    "num_embeddings": 16,
    "embedding_dim": 8,
}
SIZE = [32, 32]


def _save_untrained_vqvae(path: Path, seed: int = 0) -> Path:
    """The vqvae_2d bundle's network_def (tiny overrides) with its initial weights, saved as that bundle saves it."""
    parser = ConfigParser()
    parser.read_config(str(VQ_BUNDLE / "configs" / "inference.json"))
    for key, value in TINY_VQ.items():
        parser[key] = value
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture()
def isic_items(isic_dir, tmp_path):
    """Six real ISIC photos with their metadata (benign/malignant labels) in an ISIC-layout folder."""
    data = tmp_path / "isic"
    (data / "images").mkdir(parents=True)
    (data / "metadata").mkdir()
    for f in sorted((isic_dir / "images").glob("*.jpg"))[:6]:
        shutil.copy(f, data / "images" / f.name)
        shutil.copy(isic_dir / "metadata" / (f.stem + ".json"), data / "metadata" / (f.stem + ".json"))
    datalist = build_datalist(data, layout="isic", val_fraction=0.0, test_fraction=0.0)
    return datalist["training"]


def test_load_vqvae_reads_the_bundle_definition(tmp_path):
    ckpt = _save_untrained_vqvae(tmp_path / "model.pt")
    vqvae = load_vqvae(VQ_BUNDLE, ckpt, TINY_VQ)
    assert not vqvae.training and not any(p.requires_grad for p in vqvae.parameters())
    assert (vqvae.in_channels, vqvae.num_embeddings, vqvae.downsample_factor) == (3, 16, 4)
    expected = torch.load(ckpt, weights_only=True)
    for key, value in vqvae.state_dict().items():
        assert torch.equal(value, expected[f"model.{key}"]), key
    # a training checkpoint {"model": ..., "optimizer": ...} works as well
    torch.save({"model": expected, "optimizer": {}}, tmp_path / "checkpoint_epoch=1.pt")
    assert state_digest(load_vqvae(VQ_BUNDLE, tmp_path / "checkpoint_epoch=1.pt", TINY_VQ)) == state_digest(vqvae)
    with pytest.raises(ValueError, match="overrides"):
        load_vqvae(VQ_BUNDLE, ckpt, {**TINY_VQ, "embedding_dim": 4})
    with pytest.raises(ValueError, match="does not exist"):
        load_vqvae(VQ_BUNDLE, tmp_path / "missing.pt", TINY_VQ)


def test_extraction_leaves_the_vqvae_bit_identical(tmp_path, isic_items):
    vqvae = load_vqvae(VQ_BUNDLE, _save_untrained_vqvae(tmp_path / "model.pt"), TINY_VQ)
    before = {k: v.clone() for k, v in vqvae.state_dict().items()}
    transform = image_transforms_2d(channels=3, spatial_size=SIZE)
    codes = extract_codes(vqvae, isic_items, transform, batch_size=4)
    after = vqvae.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed during code extraction"
    assert codes.dtype == torch.int16 and codes.shape == (len(isic_items), 8, 8)
    images = torch.stack([transform(dict(i))["image"].as_tensor() for i in isic_items])
    with torch.no_grad():
        assert torch.equal(codes.long(), vqvae.encode_to_indices(images))
    # the check can fail: a training forward pass (data-initialised EMA codebook) does change the state
    vqvae.train()
    vqvae(images)
    assert any(not torch.equal(before[k], v) for k, v in vqvae.state_dict().items())


def test_cache_is_reused_and_invalidated(tmp_path, isic_items):
    ckpt = _save_untrained_vqvae(tmp_path / "model.pt")
    vqvae = load_vqvae(VQ_BUNDLE, ckpt, TINY_VQ)
    transform = image_transforms_2d(channels=3, spatial_size=SIZE)
    cache = tmp_path / "cache" / "codes.pt"
    settings = {"spatial_size": SIZE}

    first = cached_code_maps(cache, vqvae, ckpt, isic_items, transform, settings)
    assert first.extracted and cache.is_file()
    stored = torch.load(cache, weights_only=True)
    assert stored["codes"].dtype == torch.int16 and stored["fingerprint"] == first.fingerprint
    assert stored["labels"].tolist() == [i["label"] for i in isic_items]
    mtime = cache.stat().st_mtime_ns

    second = cached_code_maps(cache, vqvae, ckpt, isic_items, transform, settings)
    assert not second.extracted and cache.stat().st_mtime_ns == mtime
    assert torch.equal(second.codes, first.codes) and second.paths == first.paths

    # another checkpoint (same architecture, other weights) re-extracts
    other = _save_untrained_vqvae(ckpt, seed=1)
    changed = cached_code_maps(cache, load_vqvae(VQ_BUNDLE, other, TINY_VQ), other, isic_items, transform, settings)
    assert changed.extracted and changed.fingerprint != first.fingerprint
    assert not torch.equal(changed.codes, first.codes)

    # fewer images, or other preprocessing settings, re-extract too
    assert cached_code_maps(cache, vqvae, ckpt, isic_items[:3], transform, settings).extracted
    assert cached_code_maps(cache, vqvae, ckpt, isic_items[:3], transform, {"spatial_size": [64, 64]}).extracted

    # a damaged cache file is rebuilt, not trusted
    cache.write_bytes(b"not a torch file")
    assert cached_code_maps(cache, vqvae, ckpt, isic_items, transform, settings).extracted


def test_code_map_dataset_checks_codes_and_labels(tmp_path, isic_items):
    ckpt = _save_untrained_vqvae(tmp_path / "model.pt")
    vqvae = load_vqvae(VQ_BUNDLE, ckpt, TINY_VQ)
    ds = code_map_dataset(vqvae, ckpt, isic_items, tmp_path / "codes.pt", 16, num_classes=2, spatial_size=SIZE)
    item = ds[0]
    assert item["codes"].dtype == torch.long and item["codes"].shape == (8, 8)
    assert int(item["label"]) == isic_items[0]["label"]
    with pytest.raises(ValueError, match="num_embeddings"):
        code_map_dataset(vqvae, ckpt, isic_items, tmp_path / "codes.pt", 32, spatial_size=SIZE)
    unlabelled = [{"image": i["image"]} for i in isic_items]
    maps = code_map_dataset(vqvae, ckpt, unlabelled, tmp_path / "plain.pt", 16, spatial_size=SIZE)
    assert (maps.labels == NO_LABEL).all()
    with pytest.raises(ValueError, match="class label"):
        CodeMapDataset(maps.codes, maps.labels, 16, num_classes=2)
    with pytest.raises(ValueError, match="outside"):
        CodeMapDataset(maps.codes, maps.labels, 4)
    with pytest.raises(ValueError, match="one size"):
        odd = {"image": _odd_image(tmp_path, isic_items[0]["image"])}
        extract_codes(vqvae, [isic_items[0], odd], image_transforms_2d(channels=3))


def _odd_image(tmp_path: Path, source: str) -> str:
    """A crop of a real photo, of another size than the others."""
    path = tmp_path / "odd.png"
    Image.open(source).crop((0, 0, 40, 36)).save(path)
    return str(path)
