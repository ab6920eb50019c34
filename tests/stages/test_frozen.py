"""The stage-1 record and the frozen autoencoder read back from it: architecture round trip through plain JSON,
one loader and one error for a folder that is not a stage-1 output or whose checkpoint was swapped, one grid size,
one encode-and-cache mechanism for code maps and latents (VQ-VAE 2D/3D, VQ-VAE-2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from bundle_runner import BUNDLES
from monai.bundle import ConfigParser

from vqvae_medical.data import mni152_slices, mni152_volumes
from vqvae_medical.networks import VQVAE, VQVAE2, ReconstructionNetwork
from vqvae_medical.networks.config import build_network, network_config
from vqvae_medical.stages.autoencoder.record import (
    EMBEDDED_DATA,
    RECORD_FILE,
    data_settings,
    state_fingerprint,
    write_record,
)
from vqvae_medical.stages.encodings import encode_cached
from vqvae_medical.stages.frozen import (
    AutoencoderDirError,
    FrozenAutoencoder,
    code_map_positions,
    grid_size,
    load_autoencoder,
    read_record,
)
from vqvae_medical.utils.io import atomic_save

TINY = {"channels": (8, 16), "num_res_units": 1, "res_channels": (8, 8)}
PRE_2D = {"transforms": "image_transforms_2d", "channels": 1, "spatial_size": [64, 64]}
PRE_3D = {"transforms": "volume_transforms_3d", "channels": 1, "spatial_size": [24, 24, 24], "pixdim": None}


def _stage_one(folder: Path, model: torch.nn.Module, preprocessing: dict, image_size: list[int], seed: int = 0) -> Path:
    """``folder`` laid out as an autoencoder bundle leaves it: models/model.pt and models/autoencoder.json."""
    torch.manual_seed(seed)
    network = ReconstructionNetwork(model)
    path = atomic_save(network.state_dict(), folder / "models" / "model.pt")
    write_record(path, network, preprocessing, data_settings(None, seed=seed), image_size)
    return folder


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> list[dict]:
    """Eight of the embedded MNI152 slices (128 x 128 PNG)."""
    return mni152_slices(tmp_path_factory.mktemp("mni"))["training"][:8]


@pytest.mark.parametrize("bundle", ["vqvae", "vqvae_3d", "vqvae2"])
def test_bundle_network_def_round_trips_through_json(bundle):
    """The resolved network_def of each autoencoder bundle, written as plain JSON and rebuilt by ConfigParser, is
    the same network: same modules, same recorded arguments, and the saved weights load strictly."""
    folder, overlay = ("vqvae", ["3d.json"]) if bundle == "vqvae_3d" else (bundle, [])  # the 3D overlay
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / folder / "configs" / c) for c in ("train.json", *overlay)])
    parser["network_def#model#channels"] = [8, 16]
    parser["network_def#model#res_channels"] = [8, 8]
    parser["network_def#model#num_res_units"] = 1
    torch.manual_seed(0)
    original = parser.get_parsed_content("network_def")
    config = json.loads(json.dumps(network_config(original)))
    assert config["model"]["channels"] == [8, 16] and config["model"]["spatial_dims"] == original.model.spatial_dims
    rebuilt = build_network(config)
    assert type(rebuilt.model) is type(original.model) and repr(rebuilt) == repr(original)
    assert network_config(rebuilt) == config
    rebuilt.load_state_dict(original.state_dict(), strict=True)
    assert state_fingerprint(rebuilt) == state_fingerprint(original)
    size = [16] * original.model.spatial_dims
    x = torch.rand(1, original.model.in_channels, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), original.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "model, preprocessing, size",
    [
        (lambda: VQVAE(2, 1, num_embeddings=16, embedding_dim=8, **TINY), PRE_2D, [64, 64]),
        (lambda: VQVAE(3, 1, num_embeddings=16, embedding_dim=8, **TINY), PRE_3D, [24, 24, 24]),
        (
            lambda: VQVAE2(2, 1, channels=(8, 16), num_res_units=1, num_embeddings=(8, 16), embedding_dim=4),
            PRE_2D,
            [64, 64],
        ),
    ],
    ids=["vqvae", "vqvae_3d", "vqvae2"],
)
def test_load_autoencoder_rebuilds_the_saved_network(tmp_path, model, preprocessing, size):
    saved = model()
    folder = _stage_one(tmp_path / "stage1", saved, preprocessing, size)
    record = json.loads((folder / "models" / RECORD_FILE).read_text())
    assert record["preprocessing"] == preprocessing and record["image_size"] == size
    assert record["data"]["source"] == EMBEDDED_DATA and record["data"]["dataset_dir"] is None
    frozen = load_autoencoder(folder)
    assert frozen.directory == folder.absolute() and frozen.image_size == size
    assert repr(frozen.autoencoder) == repr(saved)
    assert frozen.fingerprint == state_fingerprint(saved)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not any(m.training for m in frozen.modules())
    x = torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(1))
    saved.eval()
    with torch.no_grad():
        expected = saved.encode_to_indices(x)
    codes = frozen.encode_to_indices(x)
    expected, codes = (expected, codes) if isinstance(codes, tuple) else ((expected,), (codes,))
    for level, (got, want) in enumerate(zip(codes, expected, strict=True)):
        assert torch.equal(got, want), level
    grids = frozen.grid_size(size)
    assert [list(c.shape[1:]) for c in codes] == (list(grids) if isinstance(grids, tuple) else [grids])
    # the preprocessing of the record is rebuilt: the images come out at the recorded size
    assert frozen.transforms().transforms[-1].__class__.__name__ == "EnsureTyped"


def test_grid_size_matches_the_code_maps():
    vq = VQVAE(2, 1, num_embeddings=16, embedding_dim=8, **TINY).eval()
    vq2 = VQVAE2(2, 1, channels=(8, 16), num_res_units=1, num_embeddings=8, embedding_dim=4).eval()
    for size in ([64, 64], [30, 45]):
        x = torch.rand(1, 1, *size)
        with torch.no_grad():
            assert grid_size(vq, size) == list(vq.encode_to_indices(x).shape[1:])
            top, bottom = vq2.encode_to_indices(x)
        assert grid_size(vq2, size) == (list(top.shape[1:]), list(bottom.shape[1:]))
    assert grid_size(vq, [30, 45]) == [8, 12]
    assert grid_size(vq2, [30, 45]) == ([4, 6], [8, 12])
    # the sequence length of a transformer prior: the positions of the (largest) code map
    assert code_map_positions(vq, [30, 45]) == code_map_positions(vq2, [30, 45]) == 96
    assert code_map_positions(FrozenAutoencoder(vq, record={"image_size": [64, 64]})) == 256
    # one level of a VQ-VAE-2 (the top prior's sequence)
    assert code_map_positions(vq2, [30, 45], level=0) == 24 and code_map_positions(vq2, [30, 45], level=1) == 96
    with pytest.raises(ValueError, match=r"level must be in \[0, 1\)"):
        code_map_positions(vq, [30, 45], level=1)
    with pytest.raises(ValueError, match="set image_size"):
        code_map_positions(vq)


def test_not_a_stage_one_folder_names_the_folder_and_what_is_missing(tmp_path):
    with pytest.raises(AutoencoderDirError, match=f"{tmp_path / 'nowhere'} does not exist"):
        load_autoencoder(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AutoencoderDirError, match="no models/model.pt and no models/autoencoder.json") as info:
        load_autoencoder(empty)
    assert str(empty) in str(info.value) and "--autoencoder_dir" in str(info.value)
    # a bundle folder trained before records existed: the checkpoint alone is not enough
    old = tmp_path / "old"
    atomic_save(ReconstructionNetwork(VQVAE(2, 1, **TINY)).state_dict(), old / "models" / "model.pt")
    with pytest.raises(AutoencoderDirError, match=r"it has no models/autoencoder.json\."):
        read_record(old)
    (old / "models" / RECORD_FILE).write_text("{not json")
    with pytest.raises(AutoencoderDirError, match="not readable JSON"):
        read_record(old)
    (old / "models" / RECORD_FILE).write_text(json.dumps({"version": 1, "network_def": {}}))
    with pytest.raises(AutoencoderDirError, match="lacks weights_sha256, spatial_dims, preprocessing, data"):
        read_record(old)
    # the message counts as a user error for the bundles' one-line error hook
    from vqvae_medical.training.runtime import _user_error

    assert _user_error(AutoencoderDirError("x")) is not None


def test_swapped_checkpoint_is_refused(tmp_path):
    folder = _stage_one(tmp_path, VQVAE(2, 1, num_embeddings=16, embedding_dim=8, **TINY), PRE_2D, [64, 64])
    load_autoencoder(folder)
    torch.manual_seed(1)
    other = ReconstructionNetwork(VQVAE(2, 1, num_embeddings=16, embedding_dim=8, **TINY))
    atomic_save(other.state_dict(), folder / "models" / "model.pt")
    with pytest.raises(AutoencoderDirError, match="models/model.pt does not match models/autoencoder.json") as info:
        load_autoencoder(folder)
    assert str(folder) in str(info.value)
    # a record whose architecture does not fit the checkpoint (edited by hand) is refused too
    write_record(folder / "models" / "model.pt", other, PRE_2D, data_settings(None))
    record = json.loads((folder / "models" / RECORD_FILE).read_text())
    record["network_def"]["model"]["embedding_dim"] = 4
    (folder / "models" / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(AutoencoderDirError, match=r"was edited after training \(network_def no longer"):
        load_autoencoder(folder)
    del record["identity_sha256"], record["sections_sha256"]  # a record of version 1 has no hashes to tell
    (folder / "models" / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(AutoencoderDirError, match="does not fit the network_def"):
        load_autoencoder(folder)


def test_encode_cached_serves_codes_and_latents(tmp_path, slices):
    folder = _stage_one(tmp_path / "stage1", VQVAE(2, 1, num_embeddings=16, embedding_dim=8, **TINY), PRE_2D, [64, 64])
    frozen = load_autoencoder(folder)
    images = torch.stack([frozen.transforms()(dict(i))["image"].as_tensor() for i in slices])
    assert list(images.shape) == [8, 1, 64, 64]

    codes = encode_cached(frozen, slices, "codes", tmp_path / "codes.pt", batch_size=3)
    assert codes.extracted and codes.values.dtype == torch.int16 and list(codes.values.shape) == [8, 16, 16]
    assert torch.equal(codes.values.long(), frozen.encode_to_indices(images))
    assert (codes.labels == -1).all() and codes.image_size == [64, 64]
    again = encode_cached(frozen, slices, "codes", tmp_path / "codes.pt")
    assert not again.extracted and torch.equal(again.values, codes.values) and again.fingerprint == codes.fingerprint

    latents = encode_cached(frozen, slices, "latents", tmp_path / "latents.pt", batch_size=3)
    assert latents.extracted and latents.values.dtype == torch.float32
    torch.testing.assert_close(latents.values, frozen.encode(images))
    assert latents.fingerprint != codes.fingerprint

    # fewer images, another autoencoder (same record layout, other weights) or other settings: encoded again
    assert encode_cached(frozen, slices[:4], "codes", tmp_path / "codes.pt").extracted
    other = load_autoencoder(
        _stage_one(
            tmp_path / "other", VQVAE(2, 1, num_embeddings=16, embedding_dim=8, **TINY), PRE_2D, [64, 64], seed=3
        )
    )
    changed = encode_cached(other, slices, "codes", tmp_path / "codes.pt")
    assert changed.extracted and changed.fingerprint != codes.fingerprint
    from vqvae_medical.data import image_transforms_2d

    crop = encode_cached(frozen, slices, "codes", None, image_transforms_2d(spatial_size=[32, 32]), {"size": 32})
    assert crop.extracted and list(crop.values.shape) == [8, 8, 8]
    # a damaged cache file is rebuilt, never trusted
    (tmp_path / "codes.pt").write_bytes(b"not a torch file")
    assert encode_cached(frozen, slices, "codes", tmp_path / "codes.pt").extracted


def test_encode_cached_vqvae2_levels_and_frozen_state(tmp_path, slices):
    model = VQVAE2(2, 1, channels=(8, 16), num_res_units=1, num_embeddings=(8, 16), embedding_dim=4)
    frozen = load_autoencoder(_stage_one(tmp_path, model, PRE_2D, [64, 64]))
    assert frozen.levels == 2 and frozen.num_embeddings == (8, 16)
    first = encode_cached(frozen, slices, "codes", tmp_path / "codes.pt")
    top, bottom = first.values
    assert (list(top.shape), list(bottom.shape)) == ([8, 8, 8], [8, 16, 16])
    cached = encode_cached(frozen, slices, "codes", tmp_path / "codes.pt")
    assert not cached.extracted and isinstance(cached.values, tuple)
    assert all(torch.equal(a, b) for a, b in zip(cached.values, first.values, strict=True))
    with pytest.raises(ValueError, match="single-level VQ-VAE"):
        encode_cached(frozen, slices, "latents")
    # the state check can fail: a training forward pass (data-initialised EMA codebooks) changes the weights
    moved = FrozenAutoencoder(VQVAE2(2, 1, channels=(8, 16), num_res_units=1, num_embeddings=8, embedding_dim=4))
    moved.autoencoder.train()
    moved.autoencoder(torch.rand(2, 1, 32, 32))
    assert state_fingerprint(moved.autoencoder) != moved.fingerprint


def test_record_data_rebuilds_the_split_3d(tmp_path):
    """A 3D record on the embedded volumes: the datalist stage 2 rebuilds from it equals the bundle's split, and
    another dataset_dir keeps the recorded preprocessing."""
    model = VQVAE(3, 1, num_embeddings=16, embedding_dim=8, **TINY)
    frozen = load_autoencoder(_stage_one(tmp_path / "stage1", model, PRE_3D, [24, 24, 24]))
    datalist = frozen.datalist(tmp_path / "cache")
    expected = mni152_volumes(tmp_path / "reference" / "mni152_volumes")
    assert [Path(i["image"]).name for i in datalist["training"]] == [
        Path(i["image"]).name for i in expected["training"]
    ]
    assert len(datalist["validation"]) == 1 and len(datalist["test"]) == 1
    volume = frozen.transforms()(dict(datalist["validation"][0]))["image"]
    assert list(volume.shape) == [1, 24, 24, 24]
    data = tmp_path / "mine"
    data.mkdir()
    for item in expected["training"][:5]:
        shutil.copy(item["image"], data)
    mine = frozen.datalist(tmp_path / "cache", dataset_dir=data, val_fraction=0.2, test_fraction=0.2)
    assert all(str(data) in i["image"] for items in mine.values() for i in items)
    assert sum(len(v) for k, v in mine.items() if k != "test" or mine["test"] is not mine["validation"]) >= 5
