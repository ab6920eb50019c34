"""The prior's code-map dataset: real ISIC photos through a frozen RGB VQ-VAE read from its stage-1 folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from vqvae_medical.data import build_datalist
from vqvae_medical.networks import VQVAE, VQVAE2, ReconstructionNetwork
from vqvae_medical.stages.autoencoder.record import data_settings, write_record
from vqvae_medical.stages.frozen import load_autoencoder
from vqvae_medical.stages.prior.codes import NO_LABEL, CodeMapDataset, code_map_dataset
from vqvae_medical.utils.io import atomic_save

SIZE = [32, 32]
PREPROCESSING = {"transforms": "image_transforms_2d", "channels": 3, "spatial_size": SIZE}


def _stage_one(folder: Path, model: torch.nn.Module, data: Path) -> Path:
    network = ReconstructionNetwork(model)
    path = atomic_save(network.state_dict(), folder / "models" / "model.pt")
    write_record(path, network, PREPROCESSING, data_settings(data, layout="isic"), SIZE)
    return folder


@pytest.fixture()
def isic(isic_dir, tmp_path):
    """Six real ISIC photos with their metadata (benign/malignant labels) in an ISIC-layout folder."""
    data = tmp_path / "isic"
    (data / "images").mkdir(parents=True)
    (data / "metadata").mkdir()
    for f in sorted((isic_dir / "images").glob("*.jpg"))[:6]:
        shutil.copy(f, data / "images" / f.name)
        shutil.copy(isic_dir / "metadata" / (f.stem + ".json"), data / "metadata" / (f.stem + ".json"))
    items = build_datalist(data, layout="isic", val_fraction=0.0, test_fraction=0.0)["training"]
    torch.manual_seed(0)
    vq = VQVAE(2, 3, channels=(8, 16), num_res_units=1, res_channels=(8, 8), num_embeddings=16, embedding_dim=8)
    return items, load_autoencoder(_stage_one(tmp_path / "stage1", vq, data))


def test_code_map_dataset_holds_the_codes_and_labels(tmp_path, isic):
    items, frozen = isic
    ds = code_map_dataset(frozen, items, tmp_path / "codes.pt", 16, num_classes=2)
    assert len(ds) == len(items)
    images = torch.stack([frozen.transforms()(dict(i))["image"].as_tensor() for i in items])
    assert torch.equal(ds.codes.long(), frozen.encode_to_indices(images))
    item = ds[0]
    assert item["codes"].dtype == torch.long and item["codes"].shape == (8, 8)
    assert [int(ds[i]["label"]) for i in range(len(ds))] == [i["label"] for i in items]
    cached = torch.load(tmp_path / "codes.pt", weights_only=True)
    assert cached["kind"] == "codes" and cached["values"].dtype == torch.int16


def test_code_map_dataset_checks_codebook_and_labels(tmp_path, isic):
    items, frozen = isic
    with pytest.raises(ValueError, match="set num_embeddings to 16"):
        code_map_dataset(frozen, items, None, 32)
    unlabelled = [{"image": i["image"]} for i in items]
    maps = code_map_dataset(frozen, unlabelled, tmp_path / "plain.pt", 16)
    assert (maps.labels == NO_LABEL).all()
    with pytest.raises(ValueError, match="class label"):
        CodeMapDataset(maps.codes, maps.labels, 16, num_classes=2)
    with pytest.raises(ValueError, match="outside"):
        CodeMapDataset(maps.codes, maps.labels, 4)


def test_code_map_dataset_refuses_a_two_level_autoencoder(tmp_path, isic):
    items, _ = isic
    vq2 = VQVAE2(2, 3, channels=(8, 16), num_res_units=1, num_embeddings=16, embedding_dim=4)
    frozen = load_autoencoder(_stage_one(tmp_path / "vq2", vq2, tmp_path / "isic"))
    with pytest.raises(ValueError, match="2 code levels"):
        code_map_dataset(frozen, items, None, 16)
