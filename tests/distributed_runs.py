"""What the two-process tests (several GPUs, several machines) share: the rank dumps and the 2D run settings."""

from __future__ import annotations

import torch

RANK_FILE = "os.path.join(@output_dir, f'rank{torch.distributed.get_rank()}.pt')"
DUMP = f"$torch.save(@network_def.state_dict(), {RANK_FILE})"
DESTROY = "$torch.distributed.destroy_process_group()"


def rank_states(out):
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    return rank0, rank1


def assert_same_weights(rank0: dict, rank1: dict) -> None:
    assert rank0.keys() == rank1.keys()
    differ = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not differ, f"differ between ranks: {differ}"


def brain_run(brain_slices, out, **settings) -> dict:
    """Overrides of a 2D autoencoder run into ``out`` on the real brain slices, split 60/20/20, cropped to 64 x 64
    (the ranks' agreement does not need the whole slice), with ``settings`` on top."""
    split = {"data_layout": "folder", "val_fraction": 0.2, "test_fraction": 0.2}
    return {"dataset_dir": brain_slices, "output_dir": out, **split, "spatial_size": [64, 64], **settings}
