"""The PixelCNN prior bundle end to end through ``python -m monai.bundle``, on the codes of a VQ-VAE trained here."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import monai.bundle
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bundle_runner import BUNDLES, read_metrics, real_diversity, real_test_images, run_bundle, run_bundle_in_process
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from PIL import Image
from tiny import TINY_PRIOR, TINY_VQVAE
from torch.utils.data import DataLoader

from vqvae_medical.networks import GatedPixelCNN, TransformerPrior, prior_cross_entropy
from vqvae_medical.stages.frozen import load_autoencoder
from vqvae_medical.stages.prior.codes import CodeMapDataset
from vqvae_medical.stages.prior.generate import PriorSampler
from vqvae_medical.stages.prior.network import PriorNetwork, load_prior, pack_inputs, prior_of
from vqvae_medical.stages.prior.report import evaluate_prior_samples
from vqvae_medical.stages.prior.steps import PriorTrainStep

BUNDLE = "pixelcnn_prior"
VQ_TINY = {**TINY_VQVAE, "in_channels": 3}  # ISIC photos
SIZE = [32, 32]  # images -> 8 x 8 code maps
#: the default prior (a transformer), tiny: 64 positions (the 8 x 8 code maps), 2 layers of 8 channels, 2 heads
TINY_TRANSFORMER = TINY_PRIOR
PRIOR_NET = {**TINY_TRANSFORMER, "num_classes": 2, "class_names": ["benign", "malignant"]}


def tiny_transformer_prior(num_classes: int | None = 2) -> PriorNetwork:
    """The network that PRIOR_NET builds from the bundle's network_def."""
    return PriorNetwork(
        TransformerPrior(2, 16, max_seq_len=64, channels=8, num_layers=2, num_heads=2, num_classes=num_classes)
    )


SPLIT = {"val_fraction": 0.2, "test_fraction": 0.2}


def _bits_per_code(prior: PriorNetwork, cache: dict) -> float:
    """Mean negative log2-likelihood per code of the cached code maps (``values``, with ``labels`` when the prior
    is class-conditioned) under ``prior``, computed here in one batch."""
    codes = cache["values"].long()
    labels = cache.get("labels") if prior_of(prior).class_conditioned else None
    with torch.no_grad():
        logits = prior.eval()(pack_inputs(codes, labels))
    return float(F.cross_entropy(logits.double(), codes)) / math.log(2.0)


def _entropy_bits(codes: torch.Tensor) -> float:
    """Entropy (bits) of the histogram of ``codes``, in numpy."""
    counts = np.bincount(codes.reshape(-1).numpy().astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


#: the tests that use ``trained`` run on one pytest-xdist worker (--dist loadgroup): it is built once
TRAINED = pytest.mark.xdist_group("pixelcnn_prior_trained")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, isic_dir):
    """12 real ISIC photos; a tiny vqvae trained one epoch on them (in this process); the prior trained 1 epoch,
    then resumed to 2 (through ``python -m monai.bundle``)."""
    data = tmp_path_factory.mktemp("isic")
    (data / "images").mkdir()
    (data / "metadata").mkdir()
    for f in sorted((isic_dir / "images").glob("*.jpg"))[:12]:
        shutil.copy(f, data / "images" / f.name)
        shutil.copy(isic_dir / "metadata" / (f.stem + ".json"), data / "metadata" / (f.stem + ".json"))
    vq_out = tmp_path_factory.mktemp("vqvae")
    run_bundle_in_process(
        "vqvae",
        ["train.json"],
        {
            **VQ_TINY,
            **SPLIT,
            "dataset_dir": data,
            "output_dir": vq_out,
            "spatial_size": SIZE,
            "batch_size": 4,
            "max_epochs": 1,
        },
    )
    vq_ckpt = vq_out / "models" / "model.pt"
    vq_hash = _sha256(vq_ckpt)
    out = tmp_path_factory.mktemp("prior")
    # the data set, its split and the preprocessing (32 x 32) come from the VQ-VAE's record
    common = {**PRIOR_NET, "autoencoder_dir": vq_out, "output_dir": out, "batch_size": 4}
    first = run_bundle(BUNDLE, ["train.json"], {**common, "max_epochs": 1, "sample_interval": 1})
    resumed = run_bundle(BUNDLE, ["train.json"], {**common, "max_epochs": 2})
    return {
        "data": data,
        "out": out,
        "vq_ckpt": vq_ckpt,
        "vq_hash": vq_hash,
        "common": common,
        "first": first,
        "resumed": resumed,
    }


@TRAINED
def test_train_writes_model_logs_checkpoints_and_samples(trained):
    out = trained["out"]
    log = trained["first"].stdout + trained["first"].stderr
    assert "-> codes [8, 8]" in log
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "checkpoint_epoch=2.pt").is_file()
    assert list((out / "logs").glob("events.out.tfevents.*")), "no TensorBoard event file"
    history = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    val = [r for r in history if r["phase"] == "validation"]
    assert [r["epoch"] for r in val] == [1, 2]
    # each epoch's validation bits per code against that epoch's checkpoint on the cached validation codes
    val_codes = torch.load(out / "cache" / "codes_validation.pt", weights_only=True)
    for r in val:
        prior = tiny_transformer_prior()
        state = torch.load(out / "models" / f"checkpoint_epoch={r['epoch']}.pt", weights_only=True)["model"]
        prior.load_state_dict(state)
        assert r["nll_bits_per_code"] == pytest.approx(_bits_per_code(prior, val_codes), rel=1e-4), r["epoch"]
    assert [r["epoch"] for r in history if r["phase"] == "train"] == [1, 2]
    for c in (0, 1):
        grid = Image.open(out / "logs" / "samples" / "epoch=1" / f"samples_class{c}.png")
        assert grid.size[0] > 100
    # the code maps were cached, with the labels of the ISIC metadata
    cache = torch.load(out / "cache" / "codes_training.pt", weights_only=True)
    assert cache["values"].dtype == torch.int16 and cache["values"].shape[1:] == (8, 8)
    assert set(cache["labels"].tolist()) <= {0, 1}
    # the VQ-VAE checkpoint is untouched
    assert _sha256(trained["vq_ckpt"]) == trained["vq_hash"]


@TRAINED
def test_resume_reads_the_cache_and_continues(trained):
    log = trained["resumed"].stdout + trained["resumed"].stderr
    assert "resumed from" in log
    assert "cached codes from" in log
    assert "-> codes" not in log, "the second run encoded the code maps again"


@TRAINED
def test_evaluate_writes_bits_per_code_and_sample_quality(trained):
    out = trained["out"]
    proc = run_bundle(BUNDLE, ["train.json", "evaluate.json"], {**trained["common"], "n_samples": 6}, threads=1)
    metrics = read_metrics(out)
    assert metrics["uniform_bits_per_code"] == pytest.approx(math.log2(16))
    assert metrics["n_maps"] >= 2 and metrics["n_codes"] == metrics["n_maps"] * 64
    # the bits per code against the trained prior's likelihood of the cached test codes, and the entropy of their
    # histogram, computed here
    test_codes = torch.load(out / "cache" / "codes_test.pt", weights_only=True)
    prior = load_prior(tiny_transformer_prior(), out / "models" / "model.pt")
    assert metrics["nll_bits_per_code"] == pytest.approx(_bits_per_code(prior, test_codes), rel=1e-4)
    assert metrics["nll_fraction_of_uniform"] == pytest.approx(metrics["nll_bits_per_code"] / 4.0)
    assert metrics["marginal_bits_per_code"] == pytest.approx(_entropy_bits(test_codes["values"]), rel=1e-6)
    assert (out / "eval" / "report.png").is_file()
    # sample quality next to the bits per code: the whole (tiny) test split is the real set
    assert metrics["n_samples"] == metrics["n_generated"] == 6 and metrics["n_real"] == metrics["n_maps"]
    test_labels = torch.load(out / "cache" / "codes_test.pt", weights_only=True)["labels"].tolist()
    per_class = {str(c): round(6 * test_labels.count(c) / len(test_labels)) for c in set(test_labels)}
    assert metrics["samples_per_class"] == {c: k for c, k in per_class.items() if k}  # in proportion to the test split
    real = real_test_images(trained["common"]["autoencoder_dir"], out / "cache")
    assert len(real) == metrics["n_real"]
    assert metrics["ms_ssim_diversity_real"] == pytest.approx(real_diversity(real, metrics), rel=1e-5)
    ratio = metrics["ms_ssim_diversity_samples"] / metrics["ms_ssim_diversity_real"]
    assert metrics["ms_ssim_diversity_ratio"] == pytest.approx(ratio)
    assert metrics["c2st_accuracy"] is None and metrics["c2st_power_blurred_real"] is None
    assert "at least 64 real and 64 generated" in metrics["c2st_skipped"]
    assert (proc.stdout + proc.stderr).count("no two-sample test") == 1
    assert metrics["cpu_seconds_per_sample"] > 0 and metrics["seconds_per_sample"] > 0
    grid = Image.open(out / "eval" / "samples_vs_real.png")
    assert grid.size[0] > 100


@TRAINED
def test_inference_samples_each_class_and_decodes(trained, tmp_path):
    out = trained["out"]
    overrides = {**PRIOR_NET, "autoencoder_dir": trained["common"]["autoencoder_dir"]}
    result = tmp_path / "result"
    run_bundle(
        BUNDLE,
        ["inference.json"],
        {**overrides, "output_dir": result, "ckpt_path": out / "models" / "model.pt", "num_samples": 4},
    )
    inf = result / "inference"
    info = json.loads((inf / "sampling.json").read_text())
    for c in (0, 1):
        codes = np.load(inf / f"samples_class{c}_codes.npy")
        assert codes.shape == (4, 8, 8) and info["classes"][c]["class_label"] == c
        assert 0 <= int(codes.min()) and int(codes.max()) < 16
        assert Image.open(inf / f"samples_class{c}.png").mode in ("RGB", "RGBA")
        assert len(list(inf.glob(f"sample_class{c}_*.png"))) == 4
    assert (inf / "samples.png").is_file()


def _bundle_args(*overrides: dict) -> dict:
    configs = BUNDLES / BUNDLE / "configs"
    merged = {"meta_file": str(configs / "metadata.json"), "config_file": str(configs / "inference.json")}
    for o in overrides:
        merged.update(o)
    return merged


@TRAINED
def test_verify_net_in_out(trained):
    meta = "_meta_#network_data_format"
    net = TINY_TRANSFORMER
    # unconditioned (the default): one code channel in, K logits out
    monai.bundle.verify_net_in_out("network_def", **_bundle_args(net, {f"{meta}#outputs#pred#num_channels": 16}))
    # class-conditioned: codes and class channels in
    monai.bundle.verify_net_in_out(
        "network_def",
        **_bundle_args(
            net, {"num_classes": 2, f"{meta}#inputs#image#num_channels": 2, f"{meta}#outputs#pred#num_channels": 16}
        ),
    )


@TRAINED
def test_ckpt_export_torchscript_equals_eager(trained, tmp_path):
    ckpt = trained["out"] / "models" / "model.pt"
    ts = tmp_path / "model.ts"
    monai.bundle.ckpt_export("network_def", **_bundle_args(PRIOR_NET, {"filepath": str(ts), "ckpt_file": str(ckpt)}))
    scripted = torch.jit.load(str(ts))
    eager = tiny_transformer_prior()
    eager.load_state_dict(torch.load(ckpt, weights_only=True))
    eager.eval()
    codes = torch.randint(0, 16, (3, 8, 8), generator=torch.Generator().manual_seed(0))
    x = pack_inputs(codes, torch.tensor([0, 1, 1]))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), rtol=0, atol=0)
        # the class channel matters
        assert not torch.equal(eager(x), eager(pack_inputs(codes, torch.tensor([1, 0, 0]))))


@TRAINED
def test_prior_step_learns_the_cached_codes(trained):
    """PriorTrainStep in MONAI's SupervisedTrainer fits the real code maps: the training NLL falls well below its
    start."""
    cache = torch.load(trained["out"] / "cache" / "codes_training.pt", weights_only=True)
    ds = CodeMapDataset(cache["values"], cache["labels"], 16, num_classes=2)
    torch.manual_seed(0)
    network = PriorNetwork(GatedPixelCNN(2, 16, 16, 2, num_classes=2))
    losses: list[float] = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=20,
        train_data_loader=DataLoader(ds, batch_size=len(ds)),
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=3e-2),
        loss_function=prior_cross_entropy,
        iteration_update=PriorTrainStep(),
        decollate=False,
    )
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["bits_per_code"]))
    )
    trainer.run()
    assert losses[0] > 3.0
    assert losses[-1] < 0.75 * losses[0], losses[::4]


@TRAINED
def test_evaluation_samples_are_seeded_and_leave_the_global_rng(trained, tmp_path):
    """The evaluate's samples (and every metric on them) depend on ``seed`` only; torch's global random state is
    the same afterwards, so sampling cannot change what the evaluator computed or what runs after it."""
    autoencoder = load_autoencoder(trained["common"]["autoencoder_dir"])
    prior = load_prior(tiny_transformer_prior(), trained["out"] / "models" / "model.pt")
    sampler = PriorSampler(autoencoder, autoencoder.image_size)
    test = autoencoder.datalist(tmp_path / "cache")["test"]
    rng = torch.get_rng_state()
    transform = autoencoder.transforms()
    runs = [
        evaluate_prior_samples(sampler, prior, test, transform, tmp_path / f"run{i}", 4, seed, merge=False)
        for i, seed in enumerate((0, 0, 1))
    ]
    assert torch.equal(torch.get_rng_state(), rng)
    drop = ("seconds_per_sample", "cpu_seconds_per_sample")
    same = [{k: v for k, v in run.items() if k not in drop} for run in runs]
    assert same[0] == same[1]
    assert same[0]["ms_ssim_diversity_samples"] != same[2]["ms_ssim_diversity_samples"]


GATED = {"num_embeddings": 16, "channels": 8, "num_layers": 2}

#: the tests that use ``brain_gated`` run on one pytest-xdist worker (--dist loadgroup): it is built once
BRAIN_GATED = pytest.mark.xdist_group("pixelcnn_prior_brain_gated")


@pytest.fixture(scope="module")
def brain_gated(tmp_path_factory, brain_files, real_folder):
    """150 real brain slices (32 x 32 centre crops), 90 % of them in the test split; a tiny vqvae and a tiny
    gated PixelCNN prior (``gated.json``) trained one epoch each on the rest (the vqvae in this process)."""
    data = real_folder(brain_files(150), tmp_path_factory.mktemp("slices"))
    vq_out = tmp_path_factory.mktemp("vqvae_brain")
    split = {"val_fraction": 0.05, "test_fraction": 0.9}
    vq = {**VQ_TINY, **split, "in_channels": 1, "dataset_dir": data, "data_layout": "folder", "spatial_size": SIZE}
    run_bundle_in_process("vqvae", ["train.json"], {**vq, "output_dir": vq_out, "batch_size": 4, "max_epochs": 1})
    out = tmp_path_factory.mktemp("gated")
    common = {**GATED, "autoencoder_dir": vq_out, "output_dir": out, "batch_size": 4}
    train = run_bundle(BUNDLE, ["train.json", "gated.json"], {**common, "max_epochs": 1}, threads=1)
    return {"out": out, "common": common, "train": train}


@BRAIN_GATED
def test_gated_overlay_trains_a_gated_pixelcnn(brain_gated):
    state = torch.load(brain_gated["out"] / "models" / "model.pt", weights_only=True)
    assert not any("transformer" in k for k in state)
    prior = load_prior(PriorNetwork(GatedPixelCNN(2, 16, 8, 2)), brain_gated["out"] / "models" / "model.pt")
    assert prior.state_dict().keys() == state.keys()


@BRAIN_GATED
def test_gated_overlay_evaluates_with_a_two_sample_test(brain_gated):
    """With at least 128 test images the evaluate runs the two-sample test and its power check: real numbers."""
    out = brain_gated["out"]
    configs = ["train.json", "gated.json", "evaluate.json"]
    c2st = {"image_size": 32, "epochs": 5, "n_folds": 2, "channels": [8, 16]}  # fast: only the plumbing is tested
    draw = {"temperature": 0.9, "top_k": 12, "top_p": 0.95}
    run_bundle(BUNDLE, configs, {**brain_gated["common"], **draw, "n_samples": 64, "c2st_settings": c2st}, threads=1)
    metrics = read_metrics(out)
    assert {k: metrics[k] for k in draw} == draw  # the metrics say how their samples were drawn
    test_codes = torch.load(out / "cache" / "codes_test.pt", weights_only=True)
    prior = load_prior(PriorNetwork(GatedPixelCNN(2, 16, 8, 2)), out / "models" / "model.pt")
    assert metrics["nll_bits_per_code"] == pytest.approx(_bits_per_code(prior, test_codes), rel=1e-4)
    assert metrics["n_maps"] == len(test_codes["values"]) >= 128
    assert metrics["n_real"] == 128 and metrics["n_generated"] == 64 and metrics["c2st_n_per_set"] == 64
    # held-out accuracies: the count of correct calls among 64 + 64 images (two folds), not a score or a loss
    for key in ("c2st_accuracy", "c2st_power_blurred_real"):
        assert metrics[key] * 128 == pytest.approx(round(metrics[key] * 128), abs=1e-9), key
    assert "c2st_skipped" not in metrics and "c2st_power_skipped" not in metrics
    assert metrics["samples_per_class"] is None and metrics["cpu_seconds_per_sample"] > 0
    assert (out / "eval" / "samples_vs_real.png").is_file()


@BRAIN_GATED
def test_gated_overlay_inference(brain_gated, tmp_path):
    common = brain_gated["common"]
    ckpt = brain_gated["out"] / "models" / "model.pt"
    overrides = {**GATED, "autoencoder_dir": common["autoencoder_dir"], "output_dir": tmp_path, "ckpt_path": ckpt}
    run_bundle(BUNDLE, ["inference.json", "gated.json"], {**overrides, "num_samples": 3}, threads=1)
    codes = np.load(tmp_path / "inference" / "samples_codes.npy")
    assert codes.shape == (3, 8, 8) and 0 <= int(codes.min()) and int(codes.max()) < 16
    assert Image.open(tmp_path / "inference" / "samples.png").size[0] > 100


@BRAIN_GATED
def test_max_seq_len_shorter_than_the_code_map_is_one_line(brain_gated, tmp_path):
    """The default transformer prior with a position table shorter than the 8 x 8 code map stops before training,
    naming max_seq_len and the value to set."""
    common = {**brain_gated["common"], "max_seq_len": 32, "output_dir": tmp_path}
    proc = run_bundle(BUNDLE, ["train.json"], {**common, "max_epochs": 1}, threads=1, expect_ok=False)
    assert proc.returncode != 0
    assert "ERROR (SettingError): max_seq_len is 32, but the code map of this autoencoder is 8 x 8 = 64" in proc.stderr
    assert "set --max_seq_len 64" in proc.stderr and "configs/gated.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "models" / "model.pt").exists()


@BRAIN_GATED
def test_evaluating_a_gated_checkpoint_without_its_overlay_is_one_line(brain_gated):
    """A gated PixelCNN checkpoint (the default before 0.4.0) evaluated with the default (transformer) configs stops
    before the evaluation with one line that names the overlay to add, and no traceback."""
    configs = ["train.json", "evaluate.json"]
    proc = run_bundle(BUNDLE, configs, {**brain_gated["common"], "n_samples": 0}, threads=1, expect_ok=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR (CheckpointError): ") and str(brain_gated["out"] / "models" / "model.pt") in last
    assert "it holds a gated PixelCNN prior and the network is a transformer: add configs/gated.json" in last
    assert "Traceback" not in proc.stderr
