"""Every bundle's metadata validates against the Model Zoo requirements, and ships the files the Zoo needs."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest
from bundle_runner import BUNDLES, _arg, copy_bundle

STAGES = ("latent_diffusion", "pixelcnn_prior", "vqvae2", "vqvae")
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
    meta = json.loads((BUNDLES / "vqvae" / "configs" / "metadata.json").read_text())
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
    "bundle, train_id, inference_id",
    [
        ("vqvae", "network_def", "network_def"),
        ("vqvae_3d", "network_def", "network_def"),
        ("vqvae2", "network_def", "network_def"),
        ("pixelcnn_prior", "network_def", "network_def"),
        # the diffusion network_def of inference.json is the generator around the trained network; the training
        # network_def needs the training latents (scale factor), so its UNet and VQ-VAE are compared
        ("latent_diffusion", "unet_def", "diffusion_def#unet"),
    ],
)
def test_inference_network_matches_training_network(bundle, train_id, inference_id):
    """train.json and inference.json define the same network (weights and constructor settings, e.g.
    ``normalize_latents``, which changes the encoder's output but no weight), so a trained checkpoint loads for
    inference and computes there what it computed in training."""
    from monai.bundle import ConfigParser

    from vqvae_medical.networks.config import TRAINING_ONLY, network_config

    shapes, settings = [], []
    bundle, overlay = ("vqvae", ["3d.json"]) if bundle == "vqvae_3d" else (bundle, [])  # the 3D overlay
    for config, net_id in (("train.json", train_id), ("inference.json", inference_id)):
        parser = ConfigParser()
        parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in (config, *overlay)])
        net = parser.get_parsed_content(net_id)
        shapes.append({k: tuple(v.shape) for k, v in net.state_dict().items()})
        try:
            recorded = network_config(getattr(net, "model", net))
        except ValueError:  # not a recorded class (the prior, the diffusion UNet): the shapes say it all
            recorded = {}
        settings.append({k: v for k, v in recorded.items() if k not in TRAINING_ONLY})
    assert shapes[0] == shapes[1]
    assert settings[0] == settings[1]


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_model_zoo_ci_checks(bundle, tmp_path):
    """What the Model Zoo's ``ci/verify_bundle.py -m full`` runs beyond the metadata (``verify_net_in_out`` and a
    TorchScript ``ckpt_export``), on a copy of the bundle with weights made from ``network_def`` as the zoo's
    ``_produce_fake_weights`` does, with the default configs and no exclusion; the exported module computes what
    the eager network does. The copy holds what the bundle ships, not what a user's runs left in its folder, and
    sits alone in ``tmp_path`` (a stage-2 bundle finds no ``../vqvae`` there)."""
    import torch
    from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

    root = copy_bundle(bundle, tmp_path / bundle)
    files = {
        "meta_file": str(root / "configs" / "metadata.json"),
        "config_file": str(root / "configs" / "inference.json"),
    }
    parser = ConfigParser()
    parser.read_config(files["config_file"])
    parser.read_meta(files["meta_file"])
    parser["bundle_root"] = str(root)
    torch.manual_seed(0)
    eager = parser.get_parsed_content("network_def").eval()
    (root / "models").mkdir(exist_ok=True)
    ckpt = root / "models" / "model.pt"
    torch.save(eager.state_dict(), ckpt)

    verify_net_in_out("network_def", bundle_root=str(root), **files)
    ts = root / "models" / "verify_model.ts"
    ckpt_export("network_def", filepath=str(ts), ckpt_file=str(ckpt), bundle_root=str(root), **files)
    exported = torch.jit.load(str(ts))
    fmt = parser.get_parsed_content("_meta_#network_data_format#inputs#image")
    spatial = [16 if s == "*" else 2 * int(str(s).split("*")[0]) for s in fmt["spatial_shape"]]  # "*": any, "k*n": n=2
    x = torch.rand(2, fmt["num_channels"], *spatial, generator=torch.Generator().manual_seed(1))
    if fmt["format"] == "labels":  # the prior: codes in channel 0, class 0 in channel 1
        x = torch.cat([x[:, :1].mul(fmt["value_range"][1] + 1).floor(), torch.zeros_like(x[:, 1:])], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), eager(x), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_train_config_amp_on_cuda_only(bundle):
    """Every train.json has a boolean ``amp`` switch; trainer and evaluator use it through ``amp_enabled`` (AMP on
    CUDA only), and the multi-GPU config keeps the trainer and evaluator of train.json."""
    train = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    assert isinstance(train.get("amp"), bool), f"{bundle}/configs/train.json lacks a boolean 'amp'"
    assert train["use_amp"] in (
        "$vqvae_medical.training.runtime.amp_enabled(@amp, @torch_device)",
        {"_target_": "vqvae_medical.training.runtime.amp_enabled", "amp": "@amp", "device": "@torch_device"},
    )
    assert train["train"]["trainer"]["amp"] == "@use_amp"
    assert train["validate"]["evaluator"]["amp"] == "@use_amp"
    multi = json.loads((BUNDLES / bundle / "configs" / "multi_gpu_train.json").read_text())
    assert not any(k in multi for k in ("amp", "use_amp", "train#trainer#amp", "validate#evaluator#amp"))


@pytest.mark.parametrize("bundle, sampler", [("pixelcnn_prior", "PriorSampler"), ("latent_diffusion", "LatentSampler")])
def test_generative_bundles_expose_the_sampler_as_inferer(bundle, sampler):
    """As the Zoo's generative bundles do: ``inferer`` of inference.json is the sampler (a MONAI ``Inferer``), and
    ``run`` is one named package call that is given it."""
    from pydoc import locate

    from monai.inferers import Inferer

    inference = json.loads((BUNDLES / bundle / "configs" / "inference.json").read_text())
    target = inference["inferer"]["_target_"]
    assert target.rsplit(".", 1)[1] == sampler and issubclass(locate(target), Inferer)
    (run,) = inference["run"]
    assert isinstance(run, dict) and "@inferer" in run.values() and callable(locate(run["_target_"]))


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_config_lines_are_under_140_characters(bundle):
    """Model Zoo style: no line of any file under configs/ (metadata.json and its prose included) is over 140
    characters; the full changelog lives in docs/README.md."""
    long_lines = [
        f"{path.name}:{number}"
        for path in sorted((BUNDLES / bundle / "configs").iterdir())
        if path.is_file()
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if len(line) > 140
    ]
    assert not long_lines, f"lines over 140 characters: {long_lines}"


def test_switching_a_setting_off_on_the_command_line():
    """What docs/troubleshooting.md says: MONAI drops a ``None`` override and keeps the config's value, ``'$None'``
    reaches the config as None, and the tests' runner writes ``None`` as ``'$None'`` so that it is not dropped."""
    from monai.bundle import ConfigParser, update_kwargs

    config = ConfigParser.load_config_file(str(BUNDLES / "vqvae" / "configs" / "train.json"))
    assert update_kwargs(dict(config), max_epochs=None)["max_epochs"] == 30
    parser = ConfigParser(update_kwargs(dict(config), wall_ceiling_minutes=_arg(None)))
    assert _arg(None) == "$None" and parser.get_parsed_content("wall_ceiling_minutes") is None
    assert parser.get_parsed_content("train#time_budget").ceiling_minutes is None
