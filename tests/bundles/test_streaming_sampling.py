"""Sampling streams (issue 31, item 6): both stage-2 bundles check the output folder before sampling, sample in
batches with a progress bar and write each batch as it comes (one file per sample, code maps streamed into ``.npy``,
the grid from the first samples), and their ``sampling.json`` names the models that made the samples.

Stage 1 and stage 2 are tiny networks with their initial weights, written as the bundles leave them
(``tests/tiny_stage2.py``); the inference runs go through ``python -m monai.bundle``. The memory figures are in
``benchmarks/streaming_memory.py`` (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from bundle_runner import BUNDLES, _arg, bundle_network, run_bundle
from PIL import Image
from tiny_stage2 import SIZE, TINY_DIFFUSION, TINY_PRIOR, diffusion_folder, prior_folder, stage_one

from vqvae_medical.evaluation.sample_files import NpyWriter, SampleFiles
from vqvae_medical.stages.autoencoder.record import record_identity
from vqvae_medical.stages.diffusion.generator import load_generator
from vqvae_medical.stages.diffusion.sampling import LatentSampler
from vqvae_medical.stages.frozen import load_autoencoder, read_record
from vqvae_medical.stages.provenance import file_sha256

PRIOR = "pixelcnn_prior"
DIFFUSION = "latent_diffusion"

#: the tests share the ``folders`` fixture: one pytest-xdist worker builds it once
FOLDERS = pytest.mark.xdist_group("streaming_sampling")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny stage-1 folder (inference reads no data) with an unconditioned prior and a diffusion model on it."""
    root = tmp_path_factory.mktemp("streaming")
    vq = stage_one(root / "vq", None)
    return {"vq": vq, "prior": prior_folder(root / "prior", vq), "diffusion": diffusion_folder(root / "diffusion", vq)}


def _prior(folders, output_dir, **overrides) -> dict:
    ckpt = folders["prior"] / "models" / "model.pt"
    return {**TINY_PRIOR, "autoencoder_dir": folders["vq"], "ckpt_path": ckpt, "output_dir": output_dir, **overrides}


def _diffusion(folders, output_dir, **overrides) -> dict:
    ckpt = folders["diffusion"] / "models" / "model.pt"
    return {
        **TINY_DIFFUSION,
        "autoencoder_dir": folders["vq"],
        "ckpt_path": ckpt,
        "output_dir": output_dir,
        **overrides,
    }


def _models_named(models: dict, ckpt, autoencoder_dir) -> None:
    record = read_record(autoencoder_dir)
    assert models["checkpoint"] == str(ckpt) and models["checkpoint_sha256"] == file_sha256(ckpt)
    assert models["autoencoder"]["dir"] == str(autoencoder_dir)
    assert models["autoencoder"]["weights_sha256"] == record["weights_sha256"]
    assert models["autoencoder"]["identity"] == record_identity(record)


# ------------------------------------------------------------------ the folder is checked before sampling
@FOLDERS
@pytest.mark.parametrize("bundle", [PRIOR, DIFFUSION])
def test_an_output_folder_below_a_file_stops_before_sampling(folders, tmp_path, bundle):
    """Before: diffusion sampled everything, then ended in a NotADirectoryError traceback."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file, so no folder can be created below it")
    out = blocker / "out"
    make = _prior if bundle == PRIOR else _diffusion
    proc = run_bundle(
        bundle,
        ["inference.json"],
        make(folders, out, **{"num_samples" if bundle == PRIOR else "n_samples": 3}),
        expect_ok=False,
    )
    assert proc.returncode != 0
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith("ERROR (SettingError):") and str(out / "inference") in last and "--output_dir" in last, last
    assert "Traceback" not in proc.stderr and "sampling:" not in proc.stderr and "sampled" not in proc.stderr


# ------------------------------------------------------------------ batches, progress, files, sampling.json
@FOLDERS
def test_prior_inference_writes_each_sample_streams_the_codes_and_names_the_models(folders, tmp_path):
    proc = run_bundle(PRIOR, ["inference.json"], _prior(folders, tmp_path, num_samples=5, batch_size=2))
    inf = tmp_path / "inference"
    assert "sampling: 100%" in proc.stderr and "5/5" in proc.stderr  # the progress bar
    files = sorted(inf.glob("sample_*.png"))
    assert [f.name for f in files] == [f"sample_{i:03d}.png" for i in range(5)]
    assert all(Image.open(f).size == (SIZE[1], SIZE[0]) for f in files)
    codes = np.load(inf / "samples_codes.npy")
    assert codes.shape == (5, 8, 8) and codes.dtype == np.int16
    # each sample file is the frozen decoder's image of its code map, in its place
    with torch.no_grad():
        decoded = load_autoencoder(folders["vq"]).decode_from_indices(torch.from_numpy(codes)).clamp(0, 1)
    pixels = np.stack([np.asarray(Image.open(f), dtype=np.float32) / 255.0 for f in files])
    np.testing.assert_allclose(pixels, decoded[:, 0].numpy(), atol=1 / 255)
    assert Image.open(inf / "samples.png").size[0] > 100
    info = json.loads((inf / "sampling.json").read_text())
    assert info["n_samples"] == 5 and info["batch_size"] == 2 and info["code_shape"] == [8, 8]
    assert info["classes"] == [
        {
            "class_label": -1,
            "name": None,
            "seed": 0,
            "codes": ["samples_codes.npy"],
            "grid": "samples.png",
            "images": "sample_<n>.png",
        }
    ]
    _models_named(info["models"], folders["prior"] / "models" / "model.pt", folders["vq"])
    assert not list(inf.glob(".*"))  # no temporary file left


@FOLDERS
def test_diffusion_inference_writes_each_sample_and_names_the_models(folders, tmp_path):
    proc = run_bundle(DIFFUSION, ["inference.json"], _diffusion(folders, tmp_path, n_samples=5, batch_size=2))
    inf = tmp_path / "inference"
    assert "sampling: 100%" in proc.stderr and "5/5" in proc.stderr
    files = sorted(inf.glob("sample_*.png"))
    assert [f.name for f in files] == [f"sample_{i:03d}.png" for i in range(5)]
    assert all(Image.open(f).size == (SIZE[1], SIZE[0]) for f in files)
    info = json.loads((inf / "sampling.json").read_text())
    assert info["n_samples"] == 5 and info["batch_size"] == 2 and info["latent_shape"] == [8, 8, 8]
    _models_named(info["models"], folders["diffusion"] / "models" / "model.pt", folders["vq"])


@FOLDERS
def test_an_interrupted_prior_run_keeps_the_samples_written_and_no_partial_result(folders, tmp_path):
    """Killed while sampling 3,000 images: the samples of the batches done are on disk, each whole; the code maps
    and sampling.json, written whole at the end, are absent. Before: nothing was written until every sample was
    drawn (the run grew to gigabytes at 20,000 samples)."""
    overrides = _prior(folders, tmp_path, num_samples=3000, batch_size=8)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root", "."]
    for key, value in overrides.items():
        cmd += [f"--{key}", _arg(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    inf = tmp_path / "inference"
    proc = subprocess.Popen(cmd, cwd=BUNDLES / PRIOR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(inf.glob("sample_*.png"))) >= 16:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it was interrupted"
        assert len(list(inf.glob("sample_*.png"))) >= 16, "no sample was written while sampling"
    finally:
        proc.kill()
        proc.wait()
    written = sorted(inf.glob("sample_*.png"))
    assert written[0].name == "sample_0000.png"
    for f in written:
        Image.open(f).load()  # each written file is whole
    assert not (inf / "sampling.json").exists() and not (inf / "samples_codes.npy").exists()


# ------------------------------------------------------------------ the pieces
@FOLDERS
def test_diffusion_sample_i_is_the_same_whatever_the_count_and_batch_size(folders):
    """The noise of each sample is drawn in turn from the seeded generator: the first 3 of 5 samples in batches of 2
    are the 3 samples of a run in one batch of 3. Compared with a tolerance: on some CPUs (AVX2 without AVX-512)
    a convolution over another batch size sums in another order, a few 1e-7 apart (issue 31, item 14)."""
    overrides = {**TINY_DIFFUSION, "autoencoder_dir": folders["vq"]}
    generator = load_generator(bundle_network(DIFFUSION, overrides), folders["diffusion"] / "models" / "model.pt")
    five, _ = LatentSampler(generator, batch_size=2).sample(5, seed=3)
    three, _ = LatentSampler(generator, batch_size=3).sample(3, seed=3)
    torch.testing.assert_close(five[:3], three, rtol=0, atol=1e-5)
    other, _ = LatentSampler(generator, batch_size=3).sample(3, seed=4)
    assert (other - three).abs().max() > 1e-3  # the seed matters


def test_npy_writer_streams_rows_and_names_the_file_when_complete(tmp_path):
    rows = torch.arange(5 * 3 * 2).reshape(5, 3, 2)
    writer = NpyWriter(tmp_path / "codes.npy", [5, 3, 2], np.int16)
    writer.write(rows[:2])
    assert not (tmp_path / "codes.npy").exists()  # absent until the last row is in
    writer.write(rows[2:])
    writer.close()
    loaded = np.load(tmp_path / "codes.npy", mmap_mode="r")
    assert loaded.dtype == np.int16 and np.array_equal(loaded, rows.numpy())
    other = NpyWriter(tmp_path / "other.npy", [2, 3, 2], np.int16)
    with pytest.raises(ValueError, match="do not fit"):
        other.write(rows)
    other.abort()
    short = NpyWriter(tmp_path / "short.npy", [5, 3, 2], np.int16)
    short.write(rows[:1])
    with pytest.raises(ValueError, match="1 of 5 rows"):
        short.close()
    short.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy"]


def test_sample_files_keep_the_first_for_the_grid_and_remove_partial_arrays_on_error(tmp_path):
    images = torch.rand(6, 1, 8, 8)
    with SampleFiles(tmp_path, 6, "sample", keep=4, arrays={"z": ([2], np.float32)}) as files:
        for i in range(0, 6, 4):
            files.add(images[i : i + 4], torch.arange(i, min(i + 4, 6)), {"z": torch.rand(min(4, 6 - i), 2)})
        files.close()
    assert len(files.kept) == 4 and files.kept_labels == [0, 1, 2, 3]
    assert torch.equal(torch.stack(files.kept), images[:4])
    assert len(list(tmp_path.glob("sample_*.png"))) == 6 and np.load(tmp_path / "z.npy").shape == (6, 2)
    (tmp_path / "b").mkdir()
    with pytest.raises(RuntimeError), SampleFiles(tmp_path / "b", 4, None, arrays={"z": ([2], np.float32)}) as broken:
        broken.add(images[:2], arrays={"z": torch.rand(2, 2)})
        raise RuntimeError("interrupted")
    assert not list((tmp_path / "b").iterdir())  # the incomplete array is gone, no image was asked for


@FOLDERS
@pytest.mark.parametrize("bundle", [PRIOR, DIFFUSION])
def test_inference_reads_the_model_of_its_output_dir(folders, tmp_path, bundle):
    """``--output_dir`` of a trained stage-2 run is enough, as for stage 1 (before: the checkpoint was looked for in
    the bundle folder whatever ``--output_dir`` said, and the run stopped with "models/model.pt: no such
    checkpoint")."""
    import shutil

    trained = shutil.copytree(folders["prior" if bundle == PRIOR else "diffusion"], tmp_path / "trained")
    make = _prior if bundle == PRIOR else _diffusion
    overrides = make(folders, trained, **{"num_samples" if bundle == PRIOR else "n_samples": 2})
    del overrides["ckpt_path"]
    run_bundle(bundle, ["inference.json"], overrides)
    sampling = json.loads((trained / "inference" / "sampling.json").read_text())
    _models_named(sampling["models"], trained / "models" / "model.pt", folders["vq"])
