"""The VQ-VAE-2 prior (top prior, bottom prior conditioned on the top codes): the packed network, its loss, cached
sampling, the codebook checks, and the pixelcnn_prior bundle with configs/vqvae2.json on a VQ-VAE-2 trained here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from bundle_runner import BUNDLES, TINY_VQVAE2_2D, read_metrics, run_bundle, run_bundle_in_process
from ignite.engine import Events
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out
from monai.engines import SupervisedTrainer
from PIL import Image
from torch.utils.data import DataLoader

from vqvae_medical.networks import VQVAE, VQVAE2, GatedPixelCNN, TransformerPrior, prior_cross_entropy
from vqvae_medical.stages.prior.codes import CodeMapDataset, check_codebooks
from vqvae_medical.stages.prior.generate import PriorSampler, sample_and_decode, save_samples
from vqvae_medical.stages.prior.hierarchical import (
    HierarchicalPrior,
    pack_hierarchical_inputs,
    sample_hierarchical,
    split_hierarchical_logits,
)
from vqvae_medical.stages.prior.steps import PriorTrainStep

K_TOP, K_BOTTOM = TINY_VQVAE2_2D["num_embeddings"]


def tiny_prior(num_classes: int | None = 2, transformer_top: bool = False, seed: int = 0) -> HierarchicalPrior:
    """A tiny top + bottom prior with weights far from initialisation, so that every input matters."""
    torch.manual_seed(seed)
    if transformer_top:
        top = TransformerPrior(2, K_TOP, 16, channels=16, num_layers=1, num_heads=2, num_classes=num_classes)
    else:
        top = GatedPixelCNN(2, K_TOP, channels=8, num_layers=2, num_classes=num_classes)
    bottom = GatedPixelCNN(
        2, K_BOTTOM, channels=8, num_layers=2, num_classes=num_classes, conditioning_num_embeddings=K_TOP
    )
    prior = HierarchicalPrior(top, bottom)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return prior.eval()


def random_codes(batch: int = 2, top_size: tuple[int, int] = (3, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    top = torch.randint(0, K_TOP, (batch, *top_size), generator=g)
    bottom = torch.randint(0, K_BOTTOM, (batch, 2 * top_size[0], 2 * top_size[1]), generator=g)
    return top, bottom


def test_packed_forward_is_each_level_prior_and_causal():
    prior = tiny_prior()
    top, bottom = random_codes()
    label = torch.tensor([0, 1])
    x = pack_hierarchical_inputs(top, bottom, label)
    assert x.shape == (2, 3, 6, 8)
    with torch.no_grad():
        top_logits, bottom_logits = prior.split_logits(prior(x))
        torch.testing.assert_close(top_logits, prior.top(top, label), rtol=0, atol=0)
        torch.testing.assert_close(bottom_logits, prior.bottom(bottom, label, top), rtol=0, atol=0)
        # bottom logits at (r, c) do not depend on bottom codes at or after (r, c); top logits not at all
        height, width = bottom.shape[1:]
        for pos in range(height * width):
            r, c = divmod(pos, width)
            changed = bottom.clone()
            changed[:, r, c] = (changed[:, r, c] + 1) % K_BOTTOM
            t, b = prior.split_logits(prior(pack_hierarchical_inputs(top, changed, label)))
            assert torch.equal(t, top_logits)
            flat, ref = b.flatten(2), bottom_logits.flatten(2)
            assert torch.equal(flat[:, :, : pos + 1], ref[:, :, : pos + 1]), (r, c)
            assert not torch.equal(flat[:, :, pos + 1 :], ref[:, :, pos + 1 :]) or pos == height * width - 1
        # top logits at (i, j) do not depend on top codes at or after (i, j); the bottom level sees the whole top map
        for pos in range(top.shape[1] * top.shape[2]):
            i, j = divmod(pos, top.shape[2])
            changed = top.clone()
            changed[:, i, j] = (changed[:, i, j] + 1) % K_TOP
            t, b = prior.split_logits(prior(pack_hierarchical_inputs(changed, bottom, label)))
            assert torch.equal(t.flatten(2)[:, :, : pos + 1], top_logits.flatten(2)[:, :, : pos + 1]), (i, j)
            assert not torch.equal(b, bottom_logits)
        # the class matters to both levels
        t, b = prior.split_logits(prior(pack_hierarchical_inputs(top, bottom, 1 - label)))
        assert not torch.equal(t, top_logits) and not torch.equal(b, bottom_logits)


def test_torchscript_equals_eager():
    prior = tiny_prior(transformer_top=True)
    x = pack_hierarchical_inputs(*random_codes(), torch.tensor([1, 0]))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(prior)(x), prior(x), rtol=0, atol=0)


@pytest.mark.parametrize("transformer_top", [False, True])
def test_cached_sampling_equals_naive(transformer_top):
    prior = tiny_prior(transformer_top=transformer_top)
    cached = sample_hierarchical(prior, 3, (3, 4), 1, generator=torch.Generator().manual_seed(7))
    naive = sample_hierarchical(prior, 3, (3, 4), 1, generator=torch.Generator().manual_seed(7), cached=False)
    assert cached[0].shape == (3, 3, 4) and cached[1].shape == (3, 6, 8)
    assert torch.equal(cached[0], naive[0]) and torch.equal(cached[1], naive[1])
    assert int(cached[0].max()) < K_TOP and int(cached[1].max()) < K_BOTTOM
    other = sample_hierarchical(prior, 3, (3, 4), 0, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(other[1], cached[1])


def test_loss_is_the_sum_of_the_level_losses_and_trains_each_level_alone():
    prior = tiny_prior().train()
    top, bottom = random_codes(4)
    labels = torch.tensor([0, 1, 1, 0])
    data = CodeMapDataset(bottom, labels, K_BOTTOM, 2, top=top, top_num_embeddings=K_TOP)
    assert set(data[0]) == {"codes", "top", "label"} and data[0]["top"].shape == (3, 4)
    outputs: list[dict] = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(data, batch_size=4),
        network=prior,
        optimizer=torch.optim.SGD(prior.parameters(), lr=0.0),
        loss_function=prior_cross_entropy,
        iteration_update=PriorTrainStep(),
        decollate=False,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()
    (out,) = outputs
    top_loss = prior_cross_entropy(prior.top(top, labels), top)
    bottom_loss = prior_cross_entropy(prior.bottom(bottom, labels, top), bottom)
    torch.testing.assert_close(out["loss"], (top_loss + bottom_loss).detach())
    torch.testing.assert_close(out["bits_per_code_top"], top_loss.detach() / math.log(2))
    torch.testing.assert_close(out["bits_per_code_bottom"], bottom_loss.detach() / math.log(2))
    total = (top_loss * top.numel() + bottom_loss * bottom.numel()) / (top.numel() + bottom.numel()) / math.log(2)
    torch.testing.assert_close(out["bits_per_code"], total.detach())
    # joint training is separate training: each level's gradient is that of its own mean loss
    grads = {name: p.grad.clone() for name, p in prior.named_parameters()}
    prior.zero_grad()
    top_loss.backward()
    bottom_loss.backward()
    for name, p in prior.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_mismatched_codebooks_name_the_config():
    vq2 = VQVAE2(2, 1, channels=(8, 16), num_res_units=1, num_embeddings=(K_TOP, K_BOTTOM), embedding_dim=4)
    vq = VQVAE(2, 1, channels=(8, 16), num_res_units=1, num_embeddings=16, embedding_dim=4)
    assert check_codebooks(vq2, [K_TOP, K_BOTTOM]) == (K_TOP, K_BOTTOM) and check_codebooks(vq, 16) == 16
    with pytest.raises(
        ValueError, match=r"VQ-VAE-2 with 2 code levels.*add configs/vqvae2.json after configs/train.json"
    ):
        check_codebooks(vq2, 16)
    with pytest.raises(ValueError, match=r"single-level VQ-VAE.*leave configs/vqvae2.json out"):
        check_codebooks(vq, [8, 16])
    with pytest.raises(ValueError, match=r"set num_embeddings to \[8, 16\]"):
        check_codebooks(vq2, [16, 16])
    # the sampler refuses a one-level prior for a VQ-VAE-2 with the same message
    with pytest.raises(ValueError, match="configs/vqvae2.json"):
        sample_and_decode(GatedPixelCNN(2, K_BOTTOM, 8, 1), vq2, 1, [16, 16])
    # the bottom prior must be conditioned on the top codebook, both levels on the same classes
    top = GatedPixelCNN(2, K_TOP, 8, 1)
    with pytest.raises(ValueError, match="conditioning_num_embeddings to the top codebook size 8"):
        HierarchicalPrior(top, GatedPixelCNN(2, K_BOTTOM, 8, 1, conditioning_num_embeddings=16))
    with pytest.raises(ValueError, match="same class conditioning"):
        HierarchicalPrior(top, GatedPixelCNN(2, K_BOTTOM, 8, 1, num_classes=2, conditioning_num_embeddings=K_TOP))
    top, bottom = random_codes()
    with pytest.raises(ValueError, match="2 times the top one"):
        pack_hierarchical_inputs(top, bottom[:, :5])
    with pytest.raises(ValueError, match="Kt = 8"):
        split_hierarchical_logits(torch.zeros(1, 8, 6, 8), K_TOP)
    with pytest.raises(ValueError, match="outside"):
        CodeMapDataset(bottom, torch.zeros(2, dtype=torch.long), K_BOTTOM, top=top, top_num_embeddings=4)


def test_sampler_decodes_the_code_pair_and_saves_both_levels(tmp_path):
    prior = tiny_prior()
    torch.manual_seed(0)
    vq2 = VQVAE2(2, 1, channels=(8, 16), num_res_units=1, num_embeddings=(K_TOP, K_BOTTOM), embedding_dim=4).eval()
    sampler = PriorSampler(vq2, [20, 32], temperature=0.8, seed=2)  # padded to 24 x 32: top 3 x 4, bottom 6 x 8
    (top, bottom), images = sampler.sample(prior, 2, 1)
    assert top.shape == (2, 3, 4) and bottom.shape == (2, 6, 8) and images.shape == (2, 1, 20, 32)
    with torch.no_grad():
        torch.testing.assert_close(images, vq2.decode_from_indices((top, bottom), [20, 32]).clamp(0, 1))
    written = save_samples(tmp_path, sampler, prior, num_samples=2, class_names=["a", "b"], seed=1, sample_files=False)
    assert sorted(p.name for p in written) == sorted(
        [
            "samples_class0.png",
            "samples_class0_codes_top.npy",
            "samples_class0_codes_bottom.npy",
            "samples_class1.png",
            "samples_class1_codes_top.npy",
            "samples_class1_codes_bottom.npy",
            "samples.png",
            "sampling.json",
        ]
    )
    saved_top, saved_bottom = (np.load(tmp_path / f"samples_class1_codes_{lv}.npy") for lv in ("top", "bottom"))
    assert torch.equal(torch.from_numpy(saved_top).long(), top)
    assert torch.equal(torch.from_numpy(saved_bottom).long(), bottom)
    info = json.loads((tmp_path / "sampling.json").read_text())
    assert info["code_shape"] == {"top": [3, 4], "bottom": [6, 8]} and info["classes"][1]["class_label"] == 1


#: configs/vqvae2.json, tiny: a transformer top prior (2 layers of 8 channels, 2 heads, the 4 x 4 top map's 16
#: positions) and a gated bottom prior (2 layers of 8 channels)
PRIOR_NET_TINY = {
    "num_embeddings": [K_TOP, K_BOTTOM],
    "channels": 8,
    "num_layers": 2,
    "num_heads": 2,
    "max_seq_len": 16,
    "bottom_channels": 8,
    "bottom_num_layers": 2,
}


def test_overlay_builds_the_same_network_for_training_and_inference():
    configs = BUNDLES / "pixelcnn_prior" / "configs"
    shapes = []
    for first in ("train.json", "inference.json"):
        parser = ConfigParser()
        parser.read_config([str(configs / first), str(configs / "vqvae2.json")])
        parser.update({**PRIOR_NET_TINY, "num_classes": 2})
        net = parser.get_parsed_content("network_def")
        assert isinstance(net, HierarchicalPrior) and net.num_embeddings == (K_TOP, K_BOTTOM)
        assert parser.get_parsed_content("autoencoder_dir").endswith("vqvae2")
        shapes.append({k: tuple(v.shape) for k, v in net.state_dict().items()})
    assert shapes[0] == shapes[1]


def test_model_zoo_tools_accept_the_hierarchical_network_def(tmp_path):
    """verify_net_in_out and a TorchScript ckpt_export of network_def with configs/vqvae2.json, with the metadata
    overrides the bundle README gives; the exported module computes the eager logits."""
    configs = BUNDLES / "pixelcnn_prior" / "configs"
    files = {
        "meta_file": str(configs / "metadata.json"),
        "config_file": [str(configs / "inference.json"), str(configs / "vqvae2.json")],
        "bundle_root": str(tmp_path),
    }
    net = PRIOR_NET_TINY
    meta = "_meta_#network_data_format"
    shapes = {
        f"{meta}#inputs#image#num_channels": 2,
        f"{meta}#inputs#image#spatial_shape": ["2*n", "2*n"],
        f"{meta}#outputs#pred#num_channels": K_TOP + K_BOTTOM,
    }
    verify_net_in_out("network_def", **files, **net, **shapes)
    parser = ConfigParser()
    parser.read_config(files["config_file"])
    parser.update(net)
    torch.manual_seed(0)
    eager = parser.get_parsed_content("network_def").eval()
    torch.save(eager.state_dict(), tmp_path / "model.pt")
    ckpt_export(
        "network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"), **files, **net
    )
    x = pack_hierarchical_inputs(*random_codes())
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "model.ts"))(x), eager(x), rtol=0, atol=0)


PRIOR_TINY = {**PRIOR_NET_TINY, "batch_size": 4}
SIZE = [32, 32]  # top codes 4 x 4, bottom codes 8 x 8

#: the tests that use ``vqvae2_prior`` run on one pytest-xdist worker (--dist loadgroup): it is built once
VQVAE2_PRIOR = pytest.mark.xdist_group("prior_hierarchical_vqvae2_prior")


@pytest.fixture(scope="module")
def vqvae2_prior(tmp_path_factory, brain_files, real_folder):
    """A tiny vqvae2 trained one epoch on 12 real brain slices (in this process), then the prior bundle with
    configs/vqvae2.json (through ``python -m monai.bundle``)."""
    data = real_folder(brain_files(12), tmp_path_factory.mktemp("brain"))
    vq_out = tmp_path_factory.mktemp("vqvae2")
    split = {"data_layout": "folder", "val_fraction": 0.2, "test_fraction": 0.2}
    overrides = {**TINY_VQVAE2_2D, **split, "dataset_dir": data, "output_dir": vq_out, "spatial_size": SIZE}
    run_bundle_in_process("vqvae2", ["train.json"], {**overrides, "batch_size": 4, "max_epochs": 1})
    out = tmp_path_factory.mktemp("prior")
    common = {**PRIOR_TINY, "autoencoder_dir": vq_out, "output_dir": out}
    train = run_bundle(
        "pixelcnn_prior", ["train.json", "vqvae2.json"], {**common, "max_epochs": 1, "sample_interval": 1}
    )
    return {"vq_out": vq_out, "out": out, "common": common, "train": train}


@VQVAE2_PRIOR
def test_bundle_trains_evaluates_and_samples_both_levels(vqvae2_prior, tmp_path):
    out, common = vqvae2_prior["out"], vqvae2_prior["common"]
    log = vqvae2_prior["train"].stdout + vqvae2_prior["train"].stderr
    assert "-> codes [[4, 4], [8, 8]]" in log
    # the default top prior is the paper's self-attention prior (a causal transformer over the 16 top positions)
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert tuple(state["top.transformer.position_embeddings.embedding.weight"].shape) == (16, 8)
    assert not any("transformer" in k for k in state if k.startswith("bottom."))
    history = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    train = [r for r in history if r["phase"] == "train"]
    val = [r for r in history if r["phase"] == "validation"]
    assert [r["epoch"] for r in val] == [1]
    assert {"bits_per_code", "bits_per_code_top", "bits_per_code_bottom"} <= set(train[0])
    for r in val:
        # one epoch (2 steps): each level still within a bit of uniform (log2 8 on top, log2 16 below), in bits
        # per code (a level's nll summed over its positions would be far off)
        assert abs(r["nll_bits_per_code_top"] - math.log2(K_TOP)) < 1.0, r
        assert abs(r["nll_bits_per_code_bottom"] - math.log2(K_BOTTOM)) < 1.0, r
        # 16 top and 64 bottom codes per image
        assert r["nll_bits_per_code"] == pytest.approx(
            (16 * r["nll_bits_per_code_top"] + 64 * r["nll_bits_per_code_bottom"]) / 80
        )
    assert (out / "logs" / "samples" / "epoch=1" / "samples.png").is_file()

    run_bundle("pixelcnn_prior", ["train.json", "vqvae2.json", "evaluate.json"], common)
    metrics = read_metrics(out)
    for level, k, n in (("top", K_TOP, 16), ("bottom", K_BOTTOM, 64)):
        assert metrics[f"uniform_bits_per_code_{level}"] == pytest.approx(math.log2(k))
        assert abs(metrics[f"nll_bits_per_code_{level}"] - math.log2(k)) < 1.0, metrics
        assert metrics[f"n_codes_{level}"] == metrics["n_maps"] * n
    assert metrics["n_codes"] == metrics["n_maps"] * 80
    expected = (16 * metrics["nll_bits_per_code_top"] + 64 * metrics["nll_bits_per_code_bottom"]) / 80
    assert metrics["nll_bits_per_code"] == pytest.approx(expected)
    assert metrics["uniform_bits_per_code"] == pytest.approx((16 * 3 + 64 * 4) / 80)
    assert (out / "eval" / "report.png").is_file()

    result = tmp_path / "result"
    sampling = {k: v for k, v in common.items() if k != "batch_size"}  # inference.json has no batch_size
    overrides = {**sampling, "output_dir": result, "ckpt_path": out / "models" / "model.pt", "num_samples": 4}
    run_bundle("pixelcnn_prior", ["inference.json", "vqvae2.json"], overrides)
    saved = {lv: np.load(result / "inference" / f"samples_codes_{lv}.npy") for lv in ("top", "bottom")}
    assert saved["top"].shape == (4, 4, 4) and saved["bottom"].shape == (4, 8, 8)
    assert int(saved["top"].max()) < K_TOP and int(saved["bottom"].max()) < K_BOTTOM
    grid = Image.open(result / "inference" / "samples.png")
    assert grid.width >= 4 * SIZE[1] and grid.height >= SIZE[0]


@VQVAE2_PRIOR
def test_single_level_config_on_a_vqvae2_names_the_overlay(vqvae2_prior, tmp_path):
    """train.json alone (one code level) on a VQ-VAE-2 folder stops with a message naming configs/vqvae2.json."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "pixelcnn_prior" / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLES / "pixelcnn_prior"), "autoencoder_dir": str(vqvae2_prior["vq_out"])})
    parser.update({"output_dir": str(tmp_path), "num_embeddings": 16})
    with pytest.raises((RuntimeError, ValueError)) as info:  # MONAI wraps the ValueError in a RuntimeError
        parser.get_parsed_content("train#dataset")
    messages, error = [], info.value
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("add configs/vqvae2.json after configs/train.json" in m for m in messages), messages


@VQVAE2_PRIOR
def test_gated_top_overlay_trains_and_samples(vqvae2_prior, tmp_path):
    """configs/vqvae2_gated_top.json after configs/vqvae2.json: a gated PixelCNN top prior instead of the default
    transformer, the gated bottom prior unchanged; train (validated per level) and sample through
    ``python -m monai.bundle``."""
    out = tmp_path / "prior"
    common = {**vqvae2_prior["common"], "output_dir": out}
    overlays = ["vqvae2.json", "vqvae2_gated_top.json"]
    run_bundle("pixelcnn_prior", ["train.json", *overlays], {**common, "max_epochs": 1})
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    top = {k: v for k, v in state.items() if k.startswith("top.")}
    assert top and not any("transformer" in k for k in top), list(top)
    assert any(k.startswith("bottom.") for k in state)
    history = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    val = [r for r in history if r["phase"] == "validation"]  # evaluate.json is the same code (tested above)
    assert len(val) == 1 and abs(val[0]["nll_bits_per_code_top"] - math.log2(K_TOP)) < 1.0
    assert abs(val[0]["nll_bits_per_code_bottom"] - math.log2(K_BOTTOM)) < 1.0
    sampling = {k: v for k, v in common.items() if k != "batch_size"}
    result = tmp_path / "result"
    run_bundle(
        "pixelcnn_prior",
        ["inference.json", *overlays],
        {**sampling, "output_dir": result, "ckpt_path": out / "models" / "model.pt", "num_samples": 2},
    )
    saved = {lv: np.load(result / "inference" / f"samples_codes_{lv}.npy") for lv in ("top", "bottom")}
    assert saved["top"].shape == (2, 4, 4) and saved["bottom"].shape == (2, 8, 8)


@VQVAE2_PRIOR
def test_single_level_run_on_a_vqvae2_is_one_line_naming_the_overlay(vqvae2_prior, tmp_path):
    """The same through ``python -m monai.bundle run``: the max_seq_len check in ``initialize`` leaves a prior of the
    other kind of autoencoder to the codebook check, whose one line names configs/vqvae2.json."""
    common = {"autoencoder_dir": vqvae2_prior["vq_out"], "output_dir": tmp_path, "num_embeddings": 16}
    proc = run_bundle("pixelcnn_prior", ["train.json"], {**common, "max_epochs": 1}, expect_ok=False)
    assert proc.returncode != 0
    assert "add configs/vqvae2.json after configs/train.json" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
