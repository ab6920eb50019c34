"""Checkpoint files: atomic writes, resume, and the debris of an interrupted write."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from ignite.engine import Engine, Events

from vqvae_medical.training.best_model import BestModelSaver
from vqvae_medical.training.checkpoints import CheckpointSaver, ResumeFromCheckpoint
from vqvae_medical.utils.io import atomic_write_json


def _trainer(model: torch.nn.Module) -> Engine:
    def step(engine, batch):
        with torch.no_grad():
            model.weight.add_(1.0)

    return Engine(step)


def test_resume_loads_the_newest_checkpoint_and_removes_stale_temporary_files(tmp_path):
    model = torch.nn.Linear(2, 2)
    trainer = _trainer(model)
    CheckpointSaver(tmp_path, {"model": model}).attach(trainer)
    trainer.run([0, 1], max_epochs=2)
    saved = model.weight.detach().clone()
    # what a process killed in the middle of a checkpoint write leaves behind
    stale = tmp_path / ".checkpoint_epoch=3.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))  # written by an earlier process

    fresh = torch.nn.Linear(2, 2)
    again = _trainer(fresh)
    resume = ResumeFromCheckpoint(tmp_path, {"model": fresh})
    resume.attach(again)
    again.run([0, 1], max_epochs=2)  # already finished: nothing to train, state restored
    assert resume.loaded_from is not None and resume.loaded_from.name.endswith("epoch=2.pt")
    assert torch.equal(fresh.weight, saved)
    assert not stale.exists()


def test_atomic_write_json_writes_strict_json_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json({"ssim": 0.8, "psnr": float("inf"), "per_level": [float("nan"), 2]}, path)
    assert json.loads(path.read_text()) == {"ssim": 0.8, "psnr": None, "per_level": [None, 2]}
    with pytest.raises(TypeError):
        atomic_write_json({"ssim": object()}, path)
    assert json.loads(path.read_text())["ssim"] == 0.8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary file left


def test_best_model_saver_keeps_the_better_model_across_runs(tmp_path):
    """The best score lives next to ``model.pt``: a new saver (a resumed run) does not overwrite a better model."""
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "models" / "model.pt"

    def validate(value: float) -> None:
        engine = Engine(lambda e, b: None)
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(ssim=value))
        BestModelSaver(path, model, "ssim").attach(engine)
        engine.run([0], max_epochs=1)

    validate(0.7)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    validate(0.6)  # worse: model.pt keeps the 0.7 weights
    assert all(torch.equal(v, best[k]) for k, v in torch.load(path, weights_only=True).items())
    assert json.loads(path.with_suffix(".pt.json").read_text()) == {"metric": "ssim", "value": 0.7}
    validate(0.9)
    assert torch.equal(torch.load(path, weights_only=True)["weight"], model.weight)
