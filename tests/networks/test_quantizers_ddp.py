"""EMA quantizer under ``torch.distributed`` (gloo, two CPU processes): ranks stay identical and match one process
fed the whole batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqvae_medical.networks.quantizers import EMAVectorQuantizer

WORLD = 2
STEPS = 5
STATE = ("codebook", "cluster_size", "embed_sum", "restarts", "initialized")
MODES = ("random", "data")  # random init, no restarts / data init with restarts

#: both tests read the module fixture ``ranks`` (one two-process run): one pytest-xdist worker (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("quantizer_ddp_ranks")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(skewed: bool) -> list[torch.Tensor]:
    """The full (global) batches, identical in every process: ``[4, D=3, 5, 6]``."""
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(STEPS):
        z = torch.randn(4, 3, 5, 6, generator=g)
        if skewed:
            z[:, :, :, 3:] *= 0.05  # half of every map collapses to ~0: many codes go dead and are restarted
        out.append(z)
    return out


def _make_quantizer(mode: str) -> EMAVectorQuantizer:
    torch.manual_seed(0)  # the same random codebook in every process
    if mode == "random":
        return EMAVectorQuantizer(2, 16, 3, decay=0.9, init="random", dead_code_threshold=0.0).train()
    return EMAVectorQuantizer(2, 24, 3, decay=0.9, init="data", dead_code_threshold=2.0).train()


def _run(q: EMAVectorQuantizer, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [q(z).indices for z in batches]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for mode in MODES:
            q = _make_quantizer(mode)
            torch.manual_seed(1000 + rank)  # different local random streams: initialisation and restarts must sync
            half = 4 // WORLD
            indices = _run(q, [z[rank * half : (rank + 1) * half] for z in _batches(skewed=mode != "random")])
            state = {name: getattr(q, name).clone() for name in STATE}
            state["indices"] = torch.stack(indices)
            torch.save(state, Path(out_dir) / f"{mode}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, torch.Tensor]]]:
    """The final state of each rank of one two-process run, per mode."""
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return {mode: [torch.load(out_dir / f"{mode}_rank{r}.pt") for r in range(WORLD)] for mode in MODES}


@pytest.mark.timeout(120)
def test_ddp_equals_single_process_on_concatenated_batch(ranks: dict) -> None:
    ranks = ranks["random"]
    for name in STATE:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
    single = _make_quantizer("random")
    indices = torch.stack(_run(single, _batches(skewed=False)))
    # each rank's indices are its half of the single-process indices, step after step
    assert torch.equal(torch.cat([ranks[0]["indices"], ranks[1]["indices"]], dim=1), indices)
    for name in ("codebook", "cluster_size", "embed_sum"):
        assert torch.allclose(ranks[0][name], getattr(single, name), rtol=1e-5, atol=1e-6), name
    # the batches did move the codebook away from its random start (so the comparison is not vacuous)
    assert not torch.allclose(_make_quantizer("random").codebook, single.codebook, atol=1e-2)


@pytest.mark.timeout(120)
def test_ddp_data_init_and_restarts_keep_ranks_identical(ranks: dict) -> None:
    ranks = ranks["data"]
    assert bool(ranks[0]["initialized"])
    assert int(ranks[0]["restarts"]) > 0  # the restart path ran under DDP
    for name in STATE:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
