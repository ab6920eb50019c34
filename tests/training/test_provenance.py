"""Every output knows what it was built from (issue #31, items 1, 2, 3, 5, 8 and 12), through ``monai.bundle run``.

- stage 1 re-run with ``--resume False`` (another seed): the earlier run's files are moved to ``previous/``, the new
  weights are written even when the earlier best score was higher, and the record fingerprints them; resuming with
  another seed is refused in one line naming both seeds;
- a prior or diffusion model used with another autoencoder than the one it was trained on is refused (inference,
  evaluation, and a re-run into the same folder); ``--resume False`` moves the old stage-2 run aside;
- a hand-edited ``autoencoder.json`` (preprocessing, image size) is refused, a non-numeric image size in a record
  without hashes too; a 2D stage 2 on a 3D VQ-VAE says "3D" before encoding; a class-conditioned prior loaded without
  ``--num_classes`` names that setting;
- files written by the atomic writers follow the umask.

Stage 1 runs on 8 embedded MNI152 slices (real data shipped with nilearn) cropped to 32 x 32, one epoch, tiny nets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from bundle_runner import TINY_VQVAE_2D, bundle_network, run_bundle, run_bundle_in_process
from tiny import TINY_DIFFUSION, TINY_PRIOR

from vqvae_medical.networks import VQVAE
from vqvae_medical.stages.autoencoder.record import data_settings, state_fingerprint, write_record
from vqvae_medical.stages.provenance import autoencoder_identity
from vqvae_medical.training.provenance import move_aside
from vqvae_medical.utils.io import atomic_save, atomic_write_json, safe_load

pytestmark = pytest.mark.xdist_group("provenance")

SIZE = [32, 32]
QUICK = {"max_epochs": 1, "max_train_items": 8, "max_val_items": 2}
STAGE_ONE = {**TINY_VQVAE_2D, **QUICK, "spatial_size": SIZE}
TINY_UNET = {**TINY_DIFFUSION, "batch_size": 4, "sample_interval": 0}
INFER_UNET = {k: v for k, v in TINY_UNET.items() if k != "sample_interval"}


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _one_line_error(proc, kind: str) -> str:
    """The ``ERROR (kind): ...`` line of a failed run, checked to be the only report (no traceback)."""
    assert proc.returncode != 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"ERROR ({kind}): ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to, ignore=shutil.ignore_patterns("cache"))
    return to


@pytest.fixture(scope="module")
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory, umask_022):
    """Two stage-1 folders: ``seed0`` and ``seed1`` (another split, other weights)."""
    out = {}
    for seed in (0, 1):
        out[seed] = tmp_path_factory.mktemp(f"vqvae_seed{seed}")
        run_bundle_in_process("vqvae", ["train.json"], {**STAGE_ONE, "seed": seed, "output_dir": out[seed]})
    return out


def _stage_two_on_seed0(bundle: str, tiny: dict, stage_one, folder: Path) -> Path:
    """``bundle`` trained (``QUICK``) in ``folder`` on the seed-0 stage-1 folder."""
    overrides = {**tiny, **QUICK, "autoencoder_dir": stage_one[0], "output_dir": folder}
    run_bundle_in_process(bundle, ["train.json"], overrides)
    return folder


@pytest.fixture(scope="module")
def prior_on_seed0(stage_one, tmp_path_factory):
    return _stage_two_on_seed0("pixelcnn_prior", TINY_PRIOR, stage_one, tmp_path_factory.mktemp("prior"))


@pytest.fixture(scope="module")
def diffusion_on_seed0(stage_one, tmp_path_factory):
    return _stage_two_on_seed0("latent_diffusion", TINY_UNET, stage_one, tmp_path_factory.mktemp("ldm"))


# ---------------------------------------------------------------------------------------------------- stage 1 (1)


def test_stage_one_fresh_run_owns_its_folder(stage_one, tmp_path):
    """``--resume False`` with another seed into a folder whose earlier run scored higher: the earlier files go to
    ``previous/``, the new weights are written and the record is theirs (before: the old model.pt stayed, next to a
    record of the new seed)."""
    out = _copy(stage_one[0], tmp_path / "run")
    old_model = _sha(out / "models" / "model.pt")
    atomic_write_json({"metric": "ssim", "value": 0.99}, out / "models" / "model.pt.json")  # a well-trained run
    proc = run_bundle("vqvae", ["train.json"], {**STAGE_ONE, "seed": 1, "resume": False, "output_dir": out})
    moved = [line for line in proc.stdout.splitlines() if "moved" in line and "earlier run" in line]
    assert len(moved) == 1 and "--resume False" in moved[0], proc.stdout[-3000:]
    (previous,) = (out / "previous").iterdir()
    assert _sha(previous / "models" / "model.pt") == old_model
    assert (previous / "models" / "checkpoint_epoch=1.pt").is_file() and (previous / "logs" / "history.jsonl").is_file()
    record = json.loads((out / "models" / "autoencoder.json").read_text())
    assert record["data"]["seed"] == 1
    weights = safe_load(out / "models" / "model.pt")
    assert record["weights_sha256"] == state_fingerprint(weights)
    assert _sha(out / "models" / "model.pt") != old_model
    assert json.loads((out / "models" / "model.pt.json").read_text())["value"] < 0.99
    history = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert sorted(h["phase"] for h in history) == ["train", "validation"]
    assert json.loads((out / "models" / "provenance.json").read_text())["identity"]["data"]["seed"] == 1


def test_stage_one_resume_with_other_data_is_refused(stage_one, tmp_path):
    """Resuming a checkpoint of seed 0 with seed 1 (another split) stops in one line naming both seeds."""
    out = _copy(stage_one[0], tmp_path / "run")
    before = {p.name: _sha(p) for p in (out / "models").iterdir()}
    proc = run_bundle(
        "vqvae", ["train.json"], {**STAGE_ONE, "seed": 1, "max_epochs": 2, "output_dir": out}, expect_ok=False
    )
    line = _one_line_error(proc, "CheckpointError")
    assert "data/seed: 0 then, 1 now" in line and "--resume False" in line
    assert {p.name: _sha(p) for p in (out / "models").iterdir()} == before


# ------------------------------------------------------------------------------------------------ stage 2 (2, 3)


def test_prior_refuses_another_autoencoder_at_inference_and_evaluation(stage_one, prior_on_seed0, tmp_path):
    """A prior trained on seed0's VQ-VAE, sampled or evaluated with seed1's: one line naming both folders."""
    common = {**TINY_PRIOR, "autoencoder_dir": stage_one[1], "output_dir": tmp_path}
    proc = run_bundle(
        "pixelcnn_prior",
        ["inference.json"],
        {**common, "ckpt_path": prior_on_seed0 / "models" / "model.pt"},
        expect_ok=False,
    )
    line = _one_line_error(proc, "AutoencoderDirError")
    assert f"trained on the autoencoder {stage_one[0]}" in line and f"--autoencoder_dir {stage_one[1]}" in line
    assert not (tmp_path / "inference").exists()
    evaluation = _copy(prior_on_seed0, tmp_path / "prior")
    proc = run_bundle(
        "pixelcnn_prior",
        ["train.json", "evaluate.json"],
        {**common, "output_dir": evaluation, "n_samples": 4},
        expect_ok=False,
    )
    line = _one_line_error(proc, "AutoencoderDirError")
    assert str(stage_one[0]) in line and str(stage_one[1]) in line
    assert not (evaluation / "eval" / "metrics.json").exists()


def test_diffusion_refuses_another_autoencoder_at_inference(stage_one, diffusion_on_seed0, tmp_path):
    proc = run_bundle(
        "latent_diffusion",
        ["inference.json"],
        {
            **INFER_UNET,
            "autoencoder_dir": stage_one[1],
            "output_dir": tmp_path,
            "n_samples": 2,
            "ckpt_path": diffusion_on_seed0 / "models" / "model.pt",
        },
        expect_ok=False,
    )
    line = _one_line_error(proc, "AutoencoderDirError")
    assert f"trained on the autoencoder {stage_one[0]}" in line and str(stage_one[1]) in line
    assert not list(tmp_path.glob("inference/*.png"))


def test_prior_rerun_on_another_autoencoder(stage_one, prior_on_seed0, tmp_path):
    """Into the same folder with another --autoencoder_dir: resuming is refused naming both autoencoders;
    ``--resume False`` moves the old prior aside and writes a prior of the new autoencoder (before: the old
    model.pt stayed whenever its score was better, and resuming went on silently)."""
    out = _copy(prior_on_seed0, tmp_path / "prior")
    old_model = _sha(out / "models" / "model.pt")
    common = {**TINY_PRIOR, **QUICK, "autoencoder_dir": stage_one[1], "output_dir": out}
    proc = run_bundle("pixelcnn_prior", ["train.json"], {**common, "max_epochs": 2}, expect_ok=False)
    line = _one_line_error(proc, "CheckpointError")
    assert f"({stage_one[0]}) then" in line and f"({stage_one[1]}) now" in line and "--resume False" in line
    atomic_write_json({"metric": "nll_bits_per_code", "value": 0.0}, out / "models" / "model.pt.json")  # unbeatable
    run_bundle("pixelcnn_prior", ["train.json"], {**common, "resume": False})
    (previous,) = (out / "previous").iterdir()
    assert _sha(previous / "models" / "model.pt") == old_model
    assert _sha(out / "models" / "model.pt") != old_model
    recorded = json.loads((out / "models" / "provenance.json").read_text())
    assert recorded["identity"]["autoencoder"] == autoencoder_identity(stage_one[1])["identity"]
    assert recorded["about"]["autoencoder"]["dir"] == str(stage_one[1])


def test_diffusion_resume_on_another_autoencoder_is_refused(stage_one, diffusion_on_seed0, tmp_path):
    """Before: it resumed, and model.pt ended with the new decoder and the old latent scale factor."""
    out = _copy(diffusion_on_seed0, tmp_path / "ldm")
    before = _sha(out / "models" / "model.pt")
    proc = run_bundle(
        "latent_diffusion",
        ["train.json"],
        {**TINY_UNET, **QUICK, "max_epochs": 2, "autoencoder_dir": stage_one[1], "output_dir": out},
        expect_ok=False,
    )
    line = _one_line_error(proc, "CheckpointError")
    assert f"({stage_one[0]}) then" in line and f"({stage_one[1]}) now" in line
    assert _sha(out / "models" / "model.pt") == before


# --------------------------------------------------------------------------------------------- the record (5, 8)


@pytest.mark.parametrize(
    ("section", "value"),
    [
        ("preprocessing", {"transforms": "image_transforms_2d", "channels": 1, "spatial_size": [48, 48]}),
        ("image_size", ["a", 32]),
    ],
)
def test_edited_record_is_refused(stage_one, tmp_path, section, value):
    folder = _copy(stage_one[0], tmp_path / "stage1")
    path = folder / "models" / "autoencoder.json"
    record = json.loads(path.read_text())
    record[section] = value
    path.write_text(json.dumps(record))
    proc = run_bundle(
        "pixelcnn_prior",
        ["train.json"],
        {**TINY_PRIOR, **QUICK, "autoencoder_dir": folder, "output_dir": tmp_path / "out"},
        expect_ok=False,
    )
    line = _one_line_error(proc, "AutoencoderDirError")
    assert f"models/autoencoder.json was edited after training ({section} " in line


def test_non_numeric_image_size_in_an_unhashed_record_is_one_line(stage_one, tmp_path):
    """A record of version 1 (no hashes) with ``"image_size": ["a", 32]``: before, a ValueError traceback."""
    folder = _copy(stage_one[0], tmp_path / "stage1")
    path = folder / "models" / "autoencoder.json"
    record = json.loads(path.read_text())
    record.update(version=1, image_size=["a", 32])
    record.pop("identity_sha256", None), record.pop("sections_sha256", None)
    path.write_text(json.dumps(record))
    proc = run_bundle(
        "pixelcnn_prior",
        ["inference.json"],
        {**TINY_PRIOR, "autoencoder_dir": folder, "output_dir": tmp_path / "out", "ckpt_path": tmp_path / "none.pt"},
        expect_ok=False,
    )
    line = _one_line_error(proc, "AutoencoderDirError")
    assert 'image_size ["a", 32]; it must be null or 2 positive whole numbers' in line


@pytest.fixture(scope="module")
def stage_one_3d(tmp_path_factory, umask_022):
    """A 3D stage-1 folder written by the record writer: a tiny untrained VQVAE on the embedded MNI152 volumes."""
    folder = tmp_path_factory.mktemp("vqvae_3d")
    torch.manual_seed(0)
    network = VQVAE(3, 1, channels=[4, 8], num_res_units=1, res_channels=[4, 4], num_embeddings=16, embedding_dim=8)
    atomic_save(network.state_dict(), folder / "models" / "model.pt")
    preprocessing = {"transforms": "volume_transforms_3d", "channels": 1, "spatial_size": [16, 16, 16]}
    write_record(folder / "models" / "model.pt", network, preprocessing, data_settings(None), [16, 16, 16])
    return folder


@pytest.mark.parametrize(
    ("bundle", "expected"),
    [
        (
            "pixelcnn_prior",
            "3D VQ-VAE, and the pixelcnn_prior bundle models 2D code maps only (it has no 3D configuration)",
        ),
        ("latent_diffusion", "is a 3D VQ-VAE but spatial_dims is 2: add configs/3d.json"),
    ],
)
def test_2d_stage_two_on_a_3d_autoencoder_says_3d_before_encoding(stage_one_3d, tmp_path, bundle, expected):
    overrides = {**QUICK, "autoencoder_dir": stage_one_3d, "output_dir": tmp_path}
    overrides.update(TINY_PRIOR if bundle == "pixelcnn_prior" else TINY_UNET)
    proc = run_bundle(bundle, ["train.json"], overrides, expect_ok=False)
    line = _one_line_error(proc, "SettingError")
    assert expected in line
    assert "encoded" not in proc.stdout and not (tmp_path / "cache").exists()


def test_class_conditioned_prior_without_num_classes_names_the_setting(stage_one, tmp_path):
    """Before: the message listed the autoencoder's settings (channels, res_channels, ...)."""
    network = bundle_network("pixelcnn_prior", {**TINY_PRIOR, "num_classes": 3})
    atomic_save(network.state_dict(), tmp_path / "models" / "model.pt")
    proc = run_bundle(
        "pixelcnn_prior",
        ["inference.json"],
        {
            **TINY_PRIOR,
            "autoencoder_dir": stage_one[0],
            "output_dir": tmp_path,
            "ckpt_path": tmp_path / "models" / "model.pt",
        },
        expect_ok=False,
    )
    line = _one_line_error(proc, "CheckpointError")
    assert "it was trained with 3 classes" in line and "pass --num_classes 3" in line and "res_channels" not in line


# ----------------------------------------------------------------------------------------------------- umask (12)


def test_atomic_writers_respect_the_umask(tmp_path, stage_one):
    """mkstemp makes 0600 files: colleagues could not read a shared output folder."""
    old = os.umask(0o027)
    try:
        a = atomic_save({"x": torch.zeros(1)}, tmp_path / "a.pt")
        b = atomic_write_json({"x": 1}, tmp_path / "b.json")
        assert stat.S_IMODE(a.stat().st_mode) == stat.S_IMODE(b.stat().st_mode) == 0o640
        os.chmod(b, 0o664)
        atomic_write_json({"x": 2}, b)  # a replaced file keeps its permissions, as with open(path, "w")
        assert stat.S_IMODE(b.stat().st_mode) == 0o664
    finally:
        os.umask(old)
    models = stage_one[0] / "models"  # written by the bundle under umask 022
    for name in ("model.pt", "model.pt.json", "autoencoder.json", "provenance.json", "checkpoint_epoch=1.pt"):
        assert stat.S_IMODE((models / name).stat().st_mode) == 0o644, name


def test_move_aside_keeps_what_this_run_wrote(tmp_path):
    """A file written by this process before the run started (TensorBoard's event file) stays; older ones move,
    keeping their paths below ``output_dir``; ``previous/`` itself is never moved."""
    old = [
        tmp_path / "models" / "model.pt",
        tmp_path / "logs" / "samples" / "epoch=1.png",
        tmp_path / "eval" / "m.json",
    ]
    for path in old:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("old")
        os.utime(path, (1.0, 1.0))
    mine = tmp_path / "logs" / "events.out.tfevents.new"
    mine.write_text("new")
    dest, moved = move_aside([tmp_path / "models", tmp_path / "logs", tmp_path / "eval"], tmp_path, before=100.0)
    assert moved == 3 and dest.parent == tmp_path / "previous"
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "eval/m.json",
        "logs/samples/epoch=1.png",
        "models/model.pt",
    ]
    assert mine.is_file() and not (tmp_path / "logs" / "samples").exists() and (tmp_path / "models").is_dir()
    assert move_aside([tmp_path / "models", tmp_path / "previous"], tmp_path, before=100.0) == (None, 0)


def test_resume_names_a_network_setting_no_shape_shows_and_leaves_shapes_to_the_loader(tmp_path):
    """Only network settings differ: one that no tensor shape shows (``normalize_latents``) is refused by the
    record; one that changes shapes gets the loader's message, which names the tensor and the value to pass."""
    from ignite.engine import Engine

    from vqvae_medical.training.checkpoints import CheckpointSaver
    from vqvae_medical.training.provenance import ResumeOrStartFresh, write_provenance
    from vqvae_medical.utils.io import CheckpointError

    def net(k: int) -> torch.nn.Module:
        return VQVAE(2, 1, channels=[4, 8], num_res_units=1, res_channels=[4, 4], num_embeddings=k, embedding_dim=4)

    engine = Engine(lambda e, b: None)
    CheckpointSaver(tmp_path / "models", {"model": net(16)}).attach(engine)
    engine.run([0], max_epochs=1)
    write_provenance(tmp_path / "models", {"network": {"num_embeddings": 16, "normalize_latents": False}})

    def resume(k: int, normalize: bool) -> None:
        identity = {"network": {"num_embeddings": k, "normalize_latents": normalize}}
        handler = ResumeOrStartFresh(tmp_path / "models", {"model": net(k)}, {"identity": identity})
        trainer = Engine(lambda e, b: None)
        handler.attach(trainer)
        trainer.run([0], max_epochs=1)

    with pytest.raises(CheckpointError, match="network/normalize_latents: false then, true now"):
        resume(16, True)
    with pytest.raises(CheckpointError, match="num_embeddings is 16 in the checkpoint and 32 here"):
        resume(32, False)
    resume(16, False)  # the same run resumes


def test_a_stored_result_is_read_back_only_for_its_key(tmp_path):
    """stored_or_computed: computed and written once, read back while the key is the same; another key, a corrupt
    file or a file of another JSON value recompute; ``check`` sees the stored record first."""
    from vqvae_medical.training.provenance import stored_or_computed

    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"value": len(calls)}

    path = tmp_path / "result.json"
    assert stored_or_computed(path, {"seed": 1}, compute, "result") == {"seed": 1, "value": 1}
    assert json.loads(path.read_text()) == {"seed": 1, "value": 1}
    assert stored_or_computed(path, {"seed": 1}, compute, "result")["value"] == 1 and len(calls) == 1
    assert stored_or_computed(path, {"seed": 2}, compute, "result") == {"seed": 2, "value": 2}
    for text in ("{not json", "[1, 2]"):
        path.write_text(text)
        assert stored_or_computed(path, {"seed": 2}, compute, "result")["value"] == len(calls)
    assert len(calls) == 4
    seen = []
    stored_or_computed(path, {"seed": 2}, compute, "result", check=seen.append)
    assert seen == [{"seed": 2, "value": 4}] and len(calls) == 4
    (tmp_path / "file").write_text("x")  # a folder that cannot be written: the result, not an error
    assert stored_or_computed(tmp_path / "file" / "r.json", {"seed": 2}, compute, "result")["value"] == 5
