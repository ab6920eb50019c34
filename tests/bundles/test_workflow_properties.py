"""Every bundle embeds in a pipeline through MONAI's workflow API: ``monai.bundle.create_workflow(config_file=...,
workflow_type="train" | "infer")`` and ``check_properties()`` lists no missing required property (MONAI's
``TrainProperties``/``InferProperties``: ``train#inferer`` and ``train#dataset`` of a training workflow;
``dataset_dir``, ``dataset``, ``evaluator``, ``inferer`` of an inference one) and no optional one under a wrong id.
Before issue #31 it raised ``KeyError`` in 7 of the 10 workflows. Tiny settings on real images; every output below
``tmp_path``."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from bundle_runner import BUNDLES, TINY_VQVAE2_2D, TINY_VQVAE_2D, _plain
from conftest import put_files
from tiny_stage2 import SIZE, TINY_DIFFUSION, TINY_PRIOR, diffusion_folder, prior_folder, stage_one

#: the generative bundles' inference reads no images: ``dataset_dir``, ``dataset`` and ``evaluator`` are ``None``
GENERATIVE = ("pixelcnn_prior", "latent_diffusion")


def _workflow(bundle: str, workflow_type: str, overrides: dict, overlay: tuple[str, ...] = ()):
    from monai.bundle import create_workflow

    configs = BUNDLES / bundle / "configs"
    config = "train.json" if workflow_type == "train" else "inference.json"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="parsing config_file", category=UserWarning)
        return create_workflow(
            config_file=[str(configs / c) for c in (config, *overlay)],
            meta_file=str(configs / "metadata.json"),
            logging_file=False,
            workflow_type=workflow_type,
            bundle_root=str(BUNDLES / bundle),
            **_plain(overrides),
        )


def _check(workflow) -> None:
    missing = workflow.check_properties()
    assert missing == [], f"missing or wrongly referenced properties: {missing}"


@pytest.fixture(scope="module")
def data(tmp_path_factory, brain_files, ixi_files) -> dict[str, Path]:
    """10 brain slices, 5 IXI volumes, a tiny stage-1 folder for them and tiny prior and diffusion folders on it."""
    root = tmp_path_factory.mktemp("properties")
    slices = put_files(brain_files(10), root / "slices")
    volumes = put_files(ixi_files(5), root / "volumes", link=True)
    vq = stage_one(root / "vq", slices)
    return {
        "slices": slices,
        "volumes": volumes,
        "vq": vq,
        "prior": prior_folder(root / "prior", vq) / "models" / "model.pt",
        "diffusion": diffusion_folder(root / "diffusion", vq) / "models" / "model.pt",
    }


def _stage_one_settings(bundle: str, data: dict[str, Path]) -> tuple[dict, dict]:
    """(train overrides, inference overrides) of a tiny one-epoch stage-1 run."""
    split = {"val_fraction": 0.2, "test_fraction": 0.2, "max_epochs": 1, "batch_size": 2}
    if bundle == "vqvae_3d":
        tiny = dict(TINY_VQVAE_2D)
        return {**tiny, **split, "dataset_dir": data["volumes"], "spatial_size": [32, 32, 32]}, {
            **tiny,
            "dataset_dir": data["volumes"],
        }
    tiny = dict(TINY_VQVAE2_2D if bundle == "vqvae2" else TINY_VQVAE_2D)
    train = {**tiny, **split, "dataset_dir": data["slices"], "data_layout": "folder", "spatial_size": SIZE}
    return train, {**tiny, "dataset_dir": data["slices"], "spatial_size": SIZE}


@pytest.mark.parametrize("bundle", ["vqvae", "vqvae2", "vqvae_3d"])
def test_autoencoder_train_and_infer_workflows_have_every_property(bundle, data, tmp_path):
    """The training workflow passes, trains one tiny epoch through ``run()``, and the inference workflow on its
    output folder passes too."""
    train, infer = _stage_one_settings(bundle, data)
    out = tmp_path / "out"
    bundle, overlay = ("vqvae", ("3d.json",)) if bundle == "vqvae_3d" else (bundle, ())  # the 3D overlay
    workflow = _workflow(bundle, "train", {**train, "output_dir": out}, overlay)
    _check(workflow)
    assert type(workflow.train_inferer).__name__ == "SimpleInferer"
    assert workflow.trainer.inferer is workflow.train_inferer
    workflow.run()
    workflow.finalize()
    assert (out / "models" / "model.pt").is_file()
    _check(_workflow(bundle, "infer", {**infer, "output_dir": out}, overlay))


def test_prior_workflows_have_every_property(data, tmp_path):
    common = {**TINY_PRIOR, "autoencoder_dir": data["vq"]}
    _check(_workflow("pixelcnn_prior", "train", {**common, "output_dir": tmp_path / "train"}))
    infer = _workflow(
        "pixelcnn_prior", "infer", {**common, "ckpt_path": data["prior"], "output_dir": tmp_path / "infer"}
    )
    _check(infer)
    assert infer.dataset_dir is None and infer.dataset is None and infer.evaluator is None


def test_latent_diffusion_workflows_have_every_property(data, tmp_path):
    common = {**TINY_DIFFUSION, "autoencoder_dir": data["vq"]}
    train = _workflow("latent_diffusion", "train", {**common, "output_dir": tmp_path / "train"})
    _check(train)
    assert train.trainer.inferer is train.train_inferer and train.evaluator.inferer is train.val_inferer
    infer = _workflow(
        "latent_diffusion", "infer", {**common, "ckpt_path": data["diffusion"], "output_dir": tmp_path / "infer"}
    )
    _check(infer)
    assert infer.dataset_dir is None and infer.dataset is None and infer.evaluator is None
