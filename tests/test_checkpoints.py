"""Checkpoint files: atomic writes, resume, and the debris of an interrupted write."""

from __future__ import annotations

import os
import time

import torch
from ignite.engine import Engine

from vqvae_medical.training.checkpoints import CheckpointSaver, ResumeFromCheckpoint


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
