"""Stage-2 settings a user gets wrong end in one ``ERROR (<kind>): ...`` line through ``python -m monai.bundle``, and
the evaluations' ``metrics.json`` is whole or absent and names the models that made it (issue 31, items 4, 7, 8).

Stage 1 and stage 2 are tiny networks with their initial weights, written as the bundles leave them
(``tests/tiny_stage2.py``), on real brain slices: what is tested is what the bundles do around the networks.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from bundle_runner import monai_bundle, run_bundle
from tiny_stage2 import TINY_DIFFUSION, TINY_PRIOR, diffusion_folder, prior_folder, slice_folder, stage_one

from vqvae_medical.stages.autoencoder.record import record_identity
from vqvae_medical.stages.frozen import read_record
from vqvae_medical.stages.provenance import file_sha256

PRIOR = "pixelcnn_prior"
DIFFUSION = "latent_diffusion"

#: the tests share the ``folders`` fixture: one pytest-xdist worker builds it once
FOLDERS = pytest.mark.xdist_group("stage2_messages")


def _one_line_error(proc, kind: str) -> str:
    """The run failed with one ``ERROR (kind): ...`` line and no traceback; returns that line."""
    assert proc.returncode != 0, (proc.stdout + proc.stderr)[-3000:]
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith(f"ERROR ({kind}):"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return last


def _models_named(models: dict, ckpt, autoencoder_dir) -> None:
    """``models`` of a sampling.json or metrics.json names this checkpoint (path, SHA-256 of the file) and this
    stage-1 folder (its record's identity and weights fingerprint)."""
    record = read_record(autoencoder_dir)
    assert models["checkpoint"] == str(ckpt) and models["checkpoint_sha256"] == file_sha256(ckpt)
    assert models["autoencoder"]["dir"] == str(autoencoder_dir)
    assert models["autoencoder"]["weights_sha256"] == record["weights_sha256"]
    assert models["autoencoder"]["identity"] == record_identity(record)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, brain_files):
    """10 real brain slices; two tiny stage-1 folders on them, one with a test split of one slice and one with three;
    an unconditioned prior and a diffusion model on the first, a class-conditioned diffusion model (2 classes), and
    a prior and a diffusion model on the second."""
    root = tmp_path_factory.mktemp("stage2")
    data = slice_folder(brain_files(10), root / "slices")
    one = stage_one(root / "vq_one_test", data, val_fraction=0.2, test_fraction=0.1)
    three = stage_one(root / "vq_three_test", data, val_fraction=0.2, test_fraction=0.3)
    return {
        "vq_one": one,
        "vq_three": three,
        "prior": prior_folder(root / "prior", one),
        "prior_three": prior_folder(root / "prior_three", three),
        "diffusion": diffusion_folder(root / "diffusion", one),
        "diffusion_classes": diffusion_folder(root / "diffusion_classes", one, num_class_embeds=2),
        "diffusion_three": diffusion_folder(root / "diffusion_three", three),
    }


def _own_copy(folder, tmp_path):
    """A copy of a stage-2 folder for one test (evaluate writes cache/ and eval/ into it)."""
    return shutil.copytree(folder, tmp_path / folder.name)


def _evaluate(folders, tmp_path, stage_two: str, autoencoder: str, n_samples: int):
    """A copy of ``folders[stage_two]`` for this test and the overrides of its evaluate on ``folders[autoencoder]``
    with ``n_samples`` samples: (the copy, the overrides)."""
    out = _own_copy(folders[stage_two], tmp_path)
    tiny = TINY_PRIOR if stage_two.startswith("prior") else TINY_DIFFUSION
    return out, {**tiny, "autoencoder_dir": folders[autoencoder], "output_dir": out, "n_samples": n_samples}


# ------------------------------------------------------------------ item 4: --class_label without classes
@FOLDERS
def test_class_label_on_an_unconditioned_prior_is_one_line(folders, tmp_path):
    """Before: the class was ignored and the samples written (exit code 0)."""
    ckpt = folders["prior"] / "models" / "model.pt"
    overrides = {**TINY_PRIOR, "autoencoder_dir": folders["vq_one"], "ckpt_path": ckpt, "output_dir": tmp_path}
    proc = run_bundle(PRIOR, ["inference.json"], {**overrides, "num_samples": 2, "class_label": 1}, expect_ok=False)
    last = _one_line_error(proc, "SettingError")
    assert "class_label is 1, but this prior has no classes" in last and "leave out --class_label" in last, last
    assert not (tmp_path / "inference").exists() or not any((tmp_path / "inference").iterdir())


# ------------------------------------------------------------------ item 8: diffusion settings
@FOLDERS
def test_class_conditioned_diffusion_without_num_class_embeds_names_the_setting(folders, tmp_path):
    """Before: a state-dict traceback ("Unexpected key(s) ... class_embedding.weight")."""
    ckpt = folders["diffusion_classes"] / "models" / "model.pt"
    overrides = {**TINY_DIFFUSION, "autoencoder_dir": folders["vq_one"], "ckpt_path": ckpt, "output_dir": tmp_path}
    proc = run_bundle(DIFFUSION, ["inference.json"], {**overrides, "n_samples": 2}, expect_ok=False)
    last = _one_line_error(proc, "CheckpointError")
    assert str(ckpt) in last and "class-conditioned model (2 classes): pass --num_class_embeds 2" in last, last


@FOLDERS
@pytest.mark.parametrize("n", [-1, 0])
def test_diffusion_n_samples_below_one_is_one_line(folders, tmp_path, n):
    """Before: -1 ended in a traceback from torch.randn, 0 in "torch.cat(): expected a non-empty list"."""
    ckpt = folders["diffusion"] / "models" / "model.pt"
    overrides = {**TINY_DIFFUSION, "autoencoder_dir": folders["vq_one"], "ckpt_path": ckpt, "output_dir": tmp_path}
    proc = run_bundle(DIFFUSION, ["inference.json"], {**overrides, "n_samples": n}, expect_ok=False)
    last = _one_line_error(proc, "SettingError")
    assert f"n_samples is {n}: pass --n_samples <a whole number of at least 1>" in last, last
    assert "sampling" not in proc.stderr.split("ERROR")[0].splitlines()[-1:]  # no progress bar: refused first


# ------------------------------------------------------------------ item 8: ckpt_export of a non-default prior
@FOLDERS
def test_ckpt_export_of_a_prior_with_other_settings_names_them(folders, tmp_path):
    """``ckpt_export`` builds network_def from the configs (the defaults: 128 channels, 6 layers, 1,024 positions)
    and loads the tiny prior's checkpoint. Before: a RuntimeError traceback listing ~100 size mismatches and no
    setting; now one line (the package's error hook is installed when a bundle command imports the package)."""
    ckpt = folders["prior"] / "models" / "model.pt"
    args = ["network_def", "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]
    args += ["--filepath", str(tmp_path / "model.ts"), "--ckpt_file", str(ckpt)]
    proc = monai_bundle(PRIOR, "ckpt_export", args, expect_ok=False)
    assert proc.returncode != 0
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert "CheckpointError" in last and "pass --channels 8 --num_layers 2 --max_seq_len 64" in last, last
    assert "pass the --num_embeddings of its autoencoder and its --num_classes" in last and "--num_heads" in last
    assert "size mismatch" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "model.ts").exists()


# ------------------------------------------------------------------ item 7: evaluate on a one-image test split
@FOLDERS
def test_prior_evaluate_on_a_one_image_test_split_stops_before_writing(folders, tmp_path):
    """Before: the bits per code were written to eval/metrics.json, then the sample quality ended in a traceback,
    leaving that partial file."""
    out, overrides = _evaluate(folders, tmp_path, "prior", "vq_one", 4)
    proc = run_bundle(PRIOR, ["train.json", "evaluate.json"], overrides, expect_ok=False)
    last = _one_line_error(proc, "SettingError")
    assert "the test split has 1 image" in last and "--n_samples 0" in last, last
    assert not (out / "eval").exists() or not any((out / "eval").iterdir())


@FOLDERS
def test_prior_evaluate_on_a_one_image_test_split_with_n_samples_0_names_the_models(folders, tmp_path):
    """The way out the message gives works: the bits per code of the one image, in a metrics.json that names the
    checkpoint and the autoencoder."""
    out, overrides = _evaluate(folders, tmp_path, "prior", "vq_one", 0)
    run_bundle(PRIOR, ["train.json", "evaluate.json"], overrides)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n_maps"] == 1 and metrics["n_codes"] == 64 and metrics["uniform_bits_per_code"] == 4.0
    # an untrained prior predicts worse than a uniform one (Jensen: random logits cost more than log2 16 bits on
    # average), in bits per code: above 4 (nats would be below), far below a sum over the 64 codes
    assert 4.0 < metrics["nll_bits_per_code"] < 8.0, metrics["nll_bits_per_code"]
    _models_named(metrics["models"], out / "models" / "model.pt", folders["vq_one"])


@FOLDERS
def test_prior_evaluate_whose_sampling_fails_leaves_no_partial_metrics(folders, tmp_path):
    """Samples of another size than the test images (``--image_size``) cannot be scored: the run fails after the
    bits per code were computed. Before: eval/metrics.json held them alone; now no metrics.json is written."""
    out, overrides = _evaluate(folders, tmp_path, "prior_three", "vq_three", 2)
    proc = run_bundle(PRIOR, ["train.json", "evaluate.json"], {**overrides, "image_size": [24, 24]}, expect_ok=False)
    assert proc.returncode != 0 and "differ in shape" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "eval" / "metrics.json").exists()


@FOLDERS
def test_prior_evaluate_with_sample_quality_writes_one_whole_metrics_file(folders, tmp_path):
    out, overrides = _evaluate(folders, tmp_path, "prior_three", "vq_three", 2)
    run_bundle(PRIOR, ["train.json", "evaluate.json"], overrides)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n_maps"] == 3 and metrics["n_samples"] == metrics["n_generated"] == 2 and metrics["n_real"] == 3
    _models_named(metrics["models"], out / "models" / "model.pt", folders["vq_three"])
    assert (out / "eval" / "samples_vs_real.png").is_file() and (out / "eval" / "report.png").is_file()


@FOLDERS
def test_diffusion_evaluate_names_the_models(folders, tmp_path):
    out, overrides = _evaluate(folders, tmp_path, "diffusion_three", "vq_three", 2)
    run_bundle(DIFFUSION, ["train.json", "evaluate.json"], overrides)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n_samples"] == 2 and metrics["n_real"] == 3
    _models_named(metrics["models"], out / "models" / "model.pt", folders["vq_three"])


def test_the_checkpoint_fingerprint_is_the_file_digest(tmp_path):
    """``checkpoint_sha256`` is what ``sha256sum`` prints for the file, so a user can check it by hand."""
    import hashlib

    path = tmp_path / "x.pt"
    torch.save({"w": torch.arange(5)}, path)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
