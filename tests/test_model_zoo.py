"""Every bundle's metadata validates against the Model Zoo requirements, and ships the files the Zoo needs."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest
from bundle_runner import BUNDLES

STAGES = ("latent_diffusion", "pixelcnn_prior", "vqvae2_2d", "vqvae_2d", "vqvae_3d")
BUNDLE_NAMES = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs" / "metadata.json").is_file())
SCHEMA = json.loads(resources.files("vqvae_medical").joinpath("schemas/metadata_schema.json").read_text())
README_SECTIONS = ("overview", "data", "training", "performance", "run", "limitations", "references")


def test_all_stages_are_bundles():
    assert set(STAGES) <= set(BUNDLE_NAMES)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_metadata_validates(bundle):
    meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    jsonschema.validate(meta, SCHEMA)
    assert meta["version"] in meta["changelog"], "the current version needs a changelog entry"


def test_schema_rejects_incomplete_metadata():
    meta = json.loads((BUNDLES / "vqvae_2d" / "configs" / "metadata.json").read_text())
    for key in ("changelog", "network_data_format", "required_packages_version"):
        broken = {k: v for k, v in meta.items() if k != key}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SCHEMA)
    broken = json.loads(json.dumps(meta))
    del broken["network_data_format"]["inputs"]["image"]["channel_def"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_bundle_files(bundle):
    root = BUNDLES / bundle
    for name in ("configs/train.json", "configs/inference.json", "configs/logging.conf", "LICENSE", "docs/README.md"):
        assert (root / name).is_file(), f"{bundle} lacks {name}"
    assert (root / "configs" / "multi_gpu_train.json").is_file(), f"{bundle} lacks configs/multi_gpu_train.json"
    readme = (root / "docs" / "README.md").read_text().lower()
    missing = [s for s in README_SECTIONS if s not in readme]
    assert not missing, f"{bundle}/docs/README.md lacks sections: {missing}"
    assert "executable code" in readme or "arbitrary code" in readme, "README must warn that configs are code"


@pytest.mark.parametrize(
    "bundle, net_id",
    [
        ("vqvae_2d", "network_def"),
        ("vqvae_3d", "network_def"),
        ("vqvae2_2d", "network_def"),
        ("pixelcnn_prior", "network_def"),
        # the diffusion network_def needs the training latents (scale factor); its UNet is compared (the VQ-VAE comes
        # from the stage-1 record of autoencoder_dir in both configs)
        ("latent_diffusion", "unet_def"),
    ],
)
def test_inference_network_matches_training_network(bundle, net_id):
    """train.json and inference.json define the same network, so a trained checkpoint loads for inference."""
    from monai.bundle import ConfigParser

    shapes = []
    for config in ("train.json", "inference.json"):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / bundle / "configs" / config))
        net = parser.get_parsed_content(net_id)
        shapes.append({k: tuple(v.shape) for k, v in net.state_dict().items()})
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_train_config_amp_on_cuda_only(bundle):
    """Every train.json has a boolean ``amp`` switch; trainer and evaluator use it through ``amp_enabled`` (AMP on
    CUDA only), and the multi-GPU config keeps the trainer and evaluator of train.json."""
    train = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    assert isinstance(train.get("amp"), bool), f"{bundle}/configs/train.json lacks a boolean 'amp'"
    assert train["use_amp"] == "$vqvae_medical.training.runtime.amp_enabled(@amp, @torch_device)"
    assert train["train"]["trainer"]["amp"] == "@use_amp"
    assert train["validate"]["evaluator"]["amp"] == "@use_amp"
    multi = json.loads((BUNDLES / bundle / "configs" / "multi_gpu_train.json").read_text())
    assert not any(k in multi for k in ("amp", "use_amp", "train#trainer#amp", "validate#evaluator#amp"))
