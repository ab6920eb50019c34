"""Two "machines" on localhost: two ``torchrun --nnodes 2 --rdzv_backend c10d`` invocations of one process each.

Both join the same c10d rendezvous on 127.0.0.1 and train the 2D VQ-VAE bundle (gloo) for two epochs on real brain
slices, as ``docs/multi_node.md`` tells users to on two hosts; the codebooks must be identical on the two ranks and
the checkpoint must load in one ordinary process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from bundle_runner import BUNDLES, TINY_VQVAE_2D, _arg, bundle_network
from distributed_runs import DESTROY, DUMP, assert_same_weights, brain_run, rank_states

from vqvae_medical.data import image_transforms_2d


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node(
    bundle: str, configs: list[str], overrides: dict, node_rank: int, nnodes: int, endpoint: str
) -> subprocess.Popen:
    """One machine's ``torchrun --nnodes <nnodes> --node_rank <r> --nproc_per_node 1 --rdzv_backend c10d
    --rdzv_endpoint <endpoint> -m monai.bundle run ...``, bound to the loopback interface."""
    files = json.dumps([f"configs/{c}" for c in configs]).replace('"', "'")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        "--rdzv_id=vqvae-test",
        "--local_addr=127.0.0.1",
        "--max_restarts=0",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        files,
        "--bundle_root",
        ".",
    ]
    for key, value in overrides.items():
        cmd += [f"--{key}", _arg(value)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "Agg",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    return subprocess.Popen(
        cmd, cwd=BUNDLES / bundle, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vqvae_two_nodes(brain_slices, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    overrides = brain_run(brain_slices, out, **TINY_VQVAE_2D, max_epochs=2, finalize=[DUMP, DESTROY])
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [_node("vqvae", ["train.json", "multi_gpu_train.json"], overrides, r, 2, endpoint) for r in (0, 1)]
    logs = []
    for node in nodes:
        try:
            logs.append(node.communicate(timeout=240)[0])
        finally:
            node.kill()
    for node, log in zip(nodes, logs, strict=True):
        assert node.returncode == 0, log[-5000:]

    # one world of two ranks across the two "machines": each wrote its weights, they agree
    rank0, rank1 = rank_states(out)
    for key in ("model.quantizer.codebook", "model.quantizer.cluster_size", "model.quantizer.embed_sum"):
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the nodes"
    assert_same_weights(rank0, rank1)
    assert bool(rank0["model.quantizer.initialized"])
    # 8 training slices / 2 ranks / batch 2 = 2 iterations per epoch: rank 0's history has both epochs
    history = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert sum(h.get("phase") == "train" for h in history) == 2, history

    # the checkpoints load in one ordinary process (strict, weights only) and hold rank 0's final weights
    ckpt = torch.load(out / "models" / "checkpoint_epoch=2.pt", weights_only=True)
    assert_same_weights(ckpt["model"], rank0)
    net = bundle_network("vqvae", {**TINY_VQVAE_2D, "spatial_size": [64, 64]}, ckpt=out / "models" / "model.pt")
    image = image_transforms_2d(spatial_size=[64, 64])({"image": str(min(brain_slices.glob("*.jpg")))})["image"]
    with torch.no_grad():
        recon = net(image.as_tensor()[None])
    assert recon.shape == (1, 1, 64, 64) and bool(torch.isfinite(recon).all())
