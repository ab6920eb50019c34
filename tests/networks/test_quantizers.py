"""Tests of the vector quantizers: nearest-code search, EMA update, initialisation, restarts, state, precision."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from vqvae_medical.networks import VQVAE, ReconstructionNetwork
from vqvae_medical.networks.quantizers import (
    EMAVectorQuantizer,
    GradientVectorQuantizer,
    QuantizerOutput,
    nearest_code,
    perplexity,
)


def brute_nearest(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest code by explicit float64 differences (no expansion trick, no chunking)."""
    diff = flat.double()[:, None, :] - codebook.double()[None, :, :]
    return diff.pow(2).sum(-1).argmin(1)


def exact_cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances by explicit differences (the matmul shortcut loses ~1e-3 near zero)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def channels_last(z: torch.Tensor) -> torch.Tensor:
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every buffer (persistent or not) and parameter of ``module``."""
    out = {f"buffer:{k}": v.detach().clone() for k, v in module.named_buffers()}
    out.update({f"param:{k}": v.detach().clone() for k, v in module.named_parameters()})
    return out


def assert_bit_identical(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = buffers(module)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed"


def peak_and_largest_allocation(fn) -> tuple[int, int]:
    """High-water mark of CPU tensor bytes allocated while running ``fn`` and its largest single allocation.

    Read from the profiler's allocation events: c10's CPU allocator reports its running total with each event.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        stack.extend(node.children)
    assert allocs, "the profiler recorded no allocation"
    allocs.sort()
    base = allocs[0][2] - allocs[0][1]
    return max(a[2] for a in allocs) - base, max(a[1] for a in allocs)


# ---------------------------------------------------------------------------------------------- nearest_code
@pytest.mark.parametrize(
    "n, k, d, max_chunk_bytes",
    [
        (1, 1, 1, 16 << 20),  # degenerate, unchunked
        (37, 5, 3, 16 << 20),  # unchunked
        (1001, 13, 7, 4 * 13 * 64),  # 64-row chunks, 1001 = 15 * 64 + 41
        (333, 17, 5, 1),  # cap below one row: one row per chunk
        (500, 300, 9, 4 * 300 * 7),  # 7-row chunks, 500 = 71 * 7 + 3
        (257, 1, 4, 4 * 1 * 10),  # a single code
        (300, 256, 5, 4 * 256 * 32),  # two-stage argmin in groups of 32, 300 = 9 * 32 + 12
        (1000, 1024, 8, 4 * 1024 * 100),  # two-stage argmin in groups of 64
        (201, 8192, 3, 4 << 20),  # two-stage argmin in groups of 128, 128-row chunks
    ],
)
def test_nearest_code_matches_brute_force(n: int, k: int, d: int, max_chunk_bytes: int) -> None:
    g = torch.Generator().manual_seed(n + k + d)
    flat = torch.randn(n, d, generator=g)
    codebook = torch.randn(k, d, generator=g)
    idx = nearest_code(flat, codebook, max_chunk_bytes)
    assert idx.dtype == torch.long and idx.shape == (n,)
    assert torch.equal(idx, brute_nearest(flat, codebook))


def test_nearest_code_chunked_equals_unchunked_on_exact_points() -> None:
    # inputs placed exactly on codes (plus tiny noise): any chunking must give the code itself
    g = torch.Generator().manual_seed(1)
    codebook = torch.randn(50, 6, generator=g) * 3
    truth = torch.randint(0, 50, (300,), generator=g)
    flat = codebook[truth] + 1e-3 * torch.randn(300, 6, generator=g)
    for cap in (1, 4 * 50 * 3, 4 * 50 * 100, 1 << 30):
        assert torch.equal(nearest_code(flat, codebook, cap), truth)


@pytest.mark.parametrize("k", [12, 256, 1024, 2048])
def test_nearest_code_ties_pick_the_lowest_index(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    # duplicated codes in different argmin groups and within one group
    for first, second in ((3, k - 1), (0, k // 2 + 1), (k // 2 - 1, k // 2), (k // 2, k // 2 + 1)):
        codebook = torch.randn(k, 4, generator=g)
        codebook[second] = codebook[first]
        flat = codebook[first] + 1e-3 * torch.randn(50, 4, generator=g)
        assert (nearest_code(flat, codebook, 4 * k * 7) == first).all()


def test_nearest_code_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        nearest_code(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(ValueError):
        nearest_code(torch.zeros(4, 3, 1), torch.zeros(5, 3))


def test_nearest_code_respects_memory_cap() -> None:
    n, k, d, cap = 20000, 1024, 16, 1 << 20  # a full distance matrix would be 78 MiB
    g = torch.Generator().manual_seed(2)
    flat, codebook = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    peak, largest = peak_and_largest_allocation(lambda: nearest_code(flat, codebook, cap))
    # one distance chunk, the argmin's small per-chunk temporaries, the int64 result and a few K-sized vectors
    assert largest <= cap
    assert peak <= 1.25 * cap + 8 * n + 16 * k + (64 << 10)
    # the measurement sees an N x K matrix when there is one (so the assertions above can fail)
    peak_full, largest_full = peak_and_largest_allocation(lambda: nearest_code(flat, codebook, 1 << 40))
    assert largest_full >= n * k * 4 and peak_full >= n * k * 4


# ---------------------------------------------------------------------------------------------- through quantizers
# small maps are searched as one channels-last matrix, maps of >= 256 vectors in place, sample by sample
SHAPES = [(2, 5, 7, 9), (1, 5, 3, 5, 7), (2, 5, 16, 17), (2, 5, 8, 7, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["ema", "gradient"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("k", [11, 256])
def test_quantizer_indices_match_brute_force(shape: tuple[int, ...], kind: str, training: bool, k: int) -> None:
    torch.manual_seed(3)
    spatial_dims, d = len(shape) - 2, shape[1]
    cap = 4 * k * 24  # 24-row chunks; N is odd so the last chunk is partial
    if kind == "ema":
        q = EMAVectorQuantizer(spatial_dims, k, d, init="random", dead_code_threshold=0.0, max_chunk_bytes=cap)
    else:
        q = GradientVectorQuantizer(spatial_dims, k, d, max_chunk_bytes=cap)
        with torch.no_grad():
            q.weight.normal_()
    q.train(training)
    z = torch.randn(*shape)
    codebook = q.get_codebook().detach().clone()  # the codebook the search uses (before any EMA update)
    expected = brute_nearest(channels_last(z), codebook).view(shape[0], *shape[2:])
    assert torch.equal(q.quantize_indices(z), expected)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert torch.equal(out.indices, expected)
    # the forward output is the code of each index (before the step's update), channels first
    assert torch.allclose(out.quantized, codebook[expected].movedim(-1, 1), atol=1e-6)
    assert torch.equal(q.embed(expected), q.get_codebook()[expected].movedim(-1, 1))


# ---------------------------------------------------------------------------------------------- EMA update
def test_ema_update_equals_hand_computed_formula() -> None:
    q = EMAVectorQuantizer(1, 2, 2, commitment_cost=0.25, decay=0.5, epsilon=1.0, init="random", dead_code_threshold=0)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        q.cluster_size.copy_(torch.tensor([1.0, 1.0]))
        q.embed_sum.copy_(q.codebook)
    # four vectors [2, 0], [0, 2], [0, 0] -> code 0 and [12, 8] -> code 1, as a [B=1, D=2, L=4] map
    z = torch.tensor([[[2.0, 0.0, 0.0, 12.0], [0.0, 2.0, 0.0, 8.0]]])
    out = q.train()(z)
    assert out.indices.tolist() == [[0, 0, 0, 1]]
    # counts (3, 1); sums (2, 2) and (12, 8)
    # cluster_size = 0.5 * 1 + 0.5 * (3, 1) = (2, 1)
    # embed_sum = 0.5 * (0, 0) + 0.5 * (2, 2) = (1, 1);  0.5 * (10, 10) + 0.5 * (12, 8) = (11, 9)
    # n = 3; smoothed = (cluster_size + 1) / (3 + 2 * 1) * 3 = (1.8, 1.2)
    # codebook = (1 / 1.8, 1 / 1.8), (11 / 1.2, 9 / 1.2)
    assert torch.allclose(q.cluster_size, torch.tensor([2.0, 1.0]))
    assert torch.allclose(q.embed_sum, torch.tensor([[1.0, 1.0], [11.0, 9.0]]))
    assert torch.allclose(q.codebook, torch.tensor([[1 / 1.8, 1 / 1.8], [11 / 1.2, 9 / 1.2]]))
    # the step quantizes with the codes it searched (0, 0) and (10, 10): squared errors 4 + 4 + 0 + 8 over 8 entries
    assert torch.allclose(out.quantized, torch.tensor([[[0.0, 0.0, 0.0, 10.0], [0.0, 0.0, 0.0, 10.0]]]))
    assert math.isclose(out.loss.item(), 0.25 * 16 / 8, rel_tol=1e-6)
    assert math.isclose(out.perplexity.item(), math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel_tol=1e-6)
    assert out.usage.item() == 1.0
    assert int(q.restarts) == 0
    # a second step follows the same recursion from the new state
    out2 = q(z)
    assert out2.indices.tolist() == [[0, 0, 0, 1]]
    assert torch.allclose(q.cluster_size, torch.tensor([0.5 * 2 + 0.5 * 3, 0.5 * 1 + 0.5 * 1]))
    assert torch.allclose(q.embed_sum, torch.tensor([[0.5 + 1.0, 0.5 + 1.0], [5.5 + 6.0, 4.5 + 4.0]]))
    smoothed = (q.cluster_size + 1.0) / (q.cluster_size.sum() + 2.0) * q.cluster_size.sum()
    assert torch.allclose(q.codebook, q.embed_sum / smoothed[:, None])


@pytest.mark.parametrize("shape", SHAPES)
def test_ema_update_matches_one_hot_reference(shape: tuple[int, ...]) -> None:
    torch.manual_seed(15)
    k, decay, eps = 9, 0.8, 0.01
    q = EMAVectorQuantizer(len(shape) - 2, k, shape[1], decay=decay, epsilon=eps, init="random", dead_code_threshold=0)
    cluster_size, embed_sum = q.cluster_size.clone().double(), q.embed_sum.clone().double()
    q.train()
    for _ in range(2):
        z = torch.randn(*shape)
        flat = channels_last(z).double()
        one_hot = F.one_hot(brute_nearest(flat, q.codebook), k).double()
        q(z)
        cluster_size = decay * cluster_size + (1 - decay) * one_hot.sum(0)
        embed_sum = decay * embed_sum + (1 - decay) * one_hot.t() @ flat
        n = cluster_size.sum()
        codebook = embed_sum / ((cluster_size + eps) / (n + k * eps) * n)[:, None]
        assert torch.allclose(q.cluster_size.double(), cluster_size, atol=1e-5)
        assert torch.allclose(q.embed_sum.double(), embed_sum, atol=1e-5)
        assert torch.allclose(q.codebook.double(), codebook, atol=1e-5)


# ---------------------------------------------------------------------------------------------- initialisation
def test_data_init_seeds_codebook_with_encoder_vectors() -> None:
    torch.manual_seed(4)
    k, d, decay = 8, 4, 0.99
    q = EMAVectorQuantizer(2, k, d, decay=decay, init="data", dead_code_threshold=0.0).train()
    assert not bool(q.initialized)
    z = torch.randn(2, d, 6, 6) * 3 + 5  # far from the unit-normal initial codebook
    flat = channels_last(z)
    out = q(z)
    assert bool(q.initialized)
    counts = torch.bincount(out.indices.reshape(-1), minlength=k).float()
    sums = torch.zeros(k, d).index_add_(0, out.indices.reshape(-1), flat)
    assert (q.cluster_size > 0).all()
    # undo the step's EMA update: every code started with the same positive weight ...
    initial_size = (q.cluster_size - (1 - decay) * counts) / decay
    assert (initial_size > 0).all()
    assert torch.allclose(initial_size, initial_size[0].expand(k), rtol=1e-5)
    # ... and the initial codebook rows are encoder vectors, all distinct (N >= K)
    initial = (q.embed_sum - (1 - decay) * sums) / (decay * initial_size[:, None])
    assert exact_cdist(initial, flat).min(1).values.max() < 1e-4
    assert torch.unique(initial.round(decimals=4), dim=0).shape[0] == k
    # the step's output was quantized with those encoder vectors
    assert exact_cdist(channels_last(out.quantized), flat).min(1).values.max() < 1e-4


def _quantization_error(q: EMAVectorQuantizer, z: torch.Tensor) -> float:
    return F.mse_loss(q.embed(q.quantize_indices(z)), z).item()


def test_kmeans_init_beats_data_init() -> None:
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(16, 4, generator=g) * 4
    pick = torch.randint(0, 16, (1024,), generator=g)
    pick[:600] = 0  # a skewed mixture: random data init over-samples the first cluster
    flat = centres[pick] + 0.3 * torch.randn(1024, 4, generator=g)
    z = flat.t().reshape(1, 4, 32, 32)
    errors = {}
    for init in ("data", "kmeans"):
        torch.manual_seed(6)
        q = EMAVectorQuantizer(2, 16, 4, init=init, kmeans_iters=10, dead_code_threshold=0.0).train()
        q(z)
        errors[init] = _quantization_error(q, z)
    assert errors["kmeans"] < 0.85 * errors["data"], errors


# ---------------------------------------------------------------------------------------------- dead codes
def _far_codebook_quantizer(threshold: float) -> EMAVectorQuantizer:
    torch.manual_seed(7)
    q = EMAVectorQuantizer(2, 16, 4, init="random", dead_code_threshold=threshold, usage_window=1).train()
    with torch.no_grad():
        q.codebook.add_(50.0)  # every code far from the data: one code wins everything
        q.embed_sum.copy_(q.codebook * q.cluster_size[:, None])
    return q


def test_dead_codes_are_restarted_and_usage_rises() -> None:
    g = torch.Generator().manual_seed(8)
    batches = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(6)]
    usage, perplexity = {}, {}
    for threshold in (0.0, 1.0):
        q = _far_codebook_quantizer(threshold)
        for z in batches:
            out = q(z)
        usage[threshold], perplexity[threshold] = out.usage.item(), out.perplexity.item()
        if threshold == 0.0:
            assert int(q.restarts) == 0
        else:
            assert int(q.restarts) >= 15  # all but the winning code were dead at the first step
    assert usage[0.0] <= 2 / 16
    assert usage[1.0] >= 0.75
    assert perplexity[1.0] > 4 * perplexity[0.0]


def test_abandoned_code_with_large_cluster_size_is_restarted_after_the_usage_window() -> None:
    """A code the encoder stops choosing keeps a large EMA cluster size for hundreds of steps; it is restarted as
    soon as it has gone unused for ``usage_window`` batches, and not before."""
    torch.manual_seed(3)
    window = 5
    q = EMAVectorQuantizer(2, 8, 4, init="random", dead_code_threshold=1.0, usage_window=window).train()
    z = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        q.codebook[7] = 100.0  # far from every vector: never chosen
        q.cluster_size.fill_(1e4)  # but with a huge EMA size, as if it had been popular
        q.embed_sum.copy_(q.codebook * q.cluster_size[:, None])
    for step in range(window):
        q(z)
        assert float(q.codebook[7, 0]) == 100.0, f"restarted too early, at step {step}"
    q(z)
    assert float(q.codebook[7].abs().max()) < 10.0, "an unused code was not restarted after the window"
    assert float(q.cluster_size[7]) == 1.0


# ---------------------------------------------------------------------------------------------- no state change
@pytest.mark.parametrize("kind", ["ema", "gradient"])
def test_lookups_and_eval_leave_state_bit_identical(kind: str) -> None:
    torch.manual_seed(9)
    if kind == "ema":
        q = EMAVectorQuantizer(3, 12, 3, init="data", dead_code_threshold=1.0)
    else:
        q = GradientVectorQuantizer(3, 12, 3)
    z = torch.randn(2, 3, 4, 3, 5)
    q.train()
    # look-ups before any training step: no initialisation happens
    before = buffers(q)
    idx = q.quantize_indices(z)
    q.embed(idx)
    assert_bit_identical(before, q)
    if kind == "ema":
        assert not bool(q.initialized)
    q(z)  # one training step (initialises and updates the EMA codebook)
    before = buffers(q)
    idx = q.quantize_indices(z)
    q.embed(idx)
    assert_bit_identical(before, q)
    q.eval()
    out = q(z)
    q.quantize_indices(z)
    q.embed(out.indices)
    assert_bit_identical(before, q)
    # and the test can see a change: another training step alters the codebook
    if kind == "ema":
        q.train()(z + 1.0)
        assert not torch.equal(before["buffer:codebook"], q.codebook)


# ---------------------------------------------------------------------------------------------- precision
def test_nearest_code_is_fp32_under_autocast_and_bf16_would_differ() -> None:
    """On the data of the autocast tests a bf16 search picks other codes (so those tests can fail), while
    ``nearest_code`` itself stays fp32 under autocast."""
    z, codebook = _autocast_data()
    flat = channels_last(z)
    fp32_idx = nearest_code(flat, codebook)
    assert torch.equal(fp32_idx, brute_nearest(flat, codebook))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_dist = torch.addmm(codebook.pow(2).sum(1), flat, codebook.t(), alpha=-2.0)
        amp_idx = nearest_code(flat, codebook)
    assert bf16_dist.dtype == torch.bfloat16
    assert not torch.equal(bf16_dist.argmin(1), fp32_idx)
    assert torch.equal(amp_idx, fp32_idx)


def _autocast_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10)
    codebook = torch.randn(64, 16, generator=g)
    z = torch.randn(2, 16, 16, 16, generator=g) * 0.5 + 3.0  # offset: bf16 rounding of x.e matters
    return z, codebook


def _quantizer_with_codebook(kind: str, codebook: torch.Tensor) -> torch.nn.Module:
    k, d = codebook.shape
    if kind == "ema":
        q = EMAVectorQuantizer(2, k, d, init="random", dead_code_threshold=1.0)
        with torch.no_grad():
            q.codebook.copy_(codebook)
            q.embed_sum.copy_(codebook * q.cluster_size[:, None])
    else:
        q = GradientVectorQuantizer(2, k, d)
        with torch.no_grad():
            q.weight.copy_(codebook)
    return q.train()


@pytest.mark.parametrize("kind", ["ema", "gradient"])
@pytest.mark.parametrize("bf16_input", [False, True])
def test_autocast_bf16_keeps_fp32_indices_and_outputs(kind: str, bf16_input: bool) -> None:
    z, codebook = _autocast_data()
    if bf16_input:
        z = z.bfloat16()
    ref_q = _quantizer_with_codebook(kind, codebook)
    amp_q = copy.deepcopy(ref_q)
    torch.manual_seed(11)
    ref = ref_q(z.float())
    ref_lookup = ref_q.quantize_indices(z.float())
    torch.manual_seed(11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(codebook, codebook.t()).dtype == torch.bfloat16  # autocast is active
        amp = amp_q(z)
        amp_lookup = amp_q.quantize_indices(z)
    assert torch.equal(amp.indices, ref.indices)
    assert torch.equal(amp_lookup, ref_lookup)
    for name in ("quantized", "loss", "perplexity", "usage"):
        assert getattr(amp, name).dtype == torch.float32, name
        assert torch.allclose(getattr(amp, name), getattr(ref, name), rtol=1e-6, atol=1e-6), name
    assert torch.equal(amp_q.get_codebook(), ref_q.get_codebook())
    if kind == "ema":
        assert torch.equal(amp_q.cluster_size, ref_q.cluster_size)
        assert torch.equal(amp_q.embed_sum, ref_q.embed_sum)


# ---------------------------------------------------------------------------------------------- gradients
def test_gradient_quantizer_loss_and_codebook_gradient() -> None:
    torch.manual_seed(12)
    k, d, beta = 6, 3, 0.4
    q = GradientVectorQuantizer(2, k, d, commitment_cost=beta).train()
    with torch.no_grad():
        q.weight.normal_()
    z = torch.randn(2, d, 5, 4)
    out = q(z)
    e = q.weight.detach()[out.indices].movedim(-1, 1)
    expected_loss = ((z - e) ** 2).mean() + beta * ((z - e) ** 2).mean()
    assert torch.allclose(out.loss, expected_loss, rtol=1e-6)
    out.loss.backward()
    # only ||sg(z) - e||^2 reaches the codebook: d/de_k = 2 (count_k e_k - sum_{i -> k} z_i) / (N D)
    flat, idx = channels_last(z), out.indices.reshape(-1)
    counts = torch.bincount(idx, minlength=k).float()
    sums = torch.zeros(k, d).index_add_(0, idx, flat)
    expected_grad = 2 * (counts[:, None] * q.weight.detach() - sums) / z.numel()
    assert q.weight.grad is not None
    assert torch.allclose(q.weight.grad, expected_grad, atol=1e-7)
    assert (q.weight.grad[counts == 0] == 0).all()


@pytest.mark.parametrize("kind", ["ema", "gradient"])
@pytest.mark.parametrize("spatial", [(3, 4, 2), (8, 8, 5)])
def test_straight_through_gradient_reaches_encoder(kind: str, spatial: tuple[int, ...]) -> None:
    torch.manual_seed(13)
    k, d, beta = 7, 3, 0.3
    if kind == "ema":
        q = EMAVectorQuantizer(3, k, d, commitment_cost=beta, init="random", dead_code_threshold=0.0)
    else:
        q = GradientVectorQuantizer(3, k, d, commitment_cost=beta)
        with torch.no_grad():
            q.weight.normal_()
    q.train()
    z = torch.randn(2, d, *spatial, requires_grad=True)
    codebook = q.get_codebook().detach().clone()
    out = q(z)
    upstream = torch.randn_like(out.quantized)
    ((out.quantized * upstream).sum() + out.loss).backward()
    e = codebook[out.indices].movedim(-1, 1)
    expected = upstream + beta * 2 * (z.detach() - e) / z.numel()
    assert torch.allclose(z.grad, expected, atol=1e-7)


@pytest.mark.parametrize("kind", ["ema", "gradient"])
@pytest.mark.parametrize("spatial", [(3, 4), (16, 17)])
def test_quantized_output_allows_inplace_ops(kind: str, spatial: tuple[int, ...]) -> None:
    q = EMAVectorQuantizer(2, 8, 4, init="random") if kind == "ema" else GradientVectorQuantizer(2, 8, 4)
    z = torch.randn(2, 4, *spatial, requires_grad=True)
    out = q.train()(z)
    assert out.quantized.is_contiguous()
    y = out.quantized.relu_()  # e.g. an in-place activation right after the quantizer
    (y.sum() + out.loss).backward()
    assert z.grad is not None and z.grad.shape == z.shape


# ---------------------------------------------------------------------------------------------- perplexity, usage
def test_perplexity() -> None:
    uniform = torch.bincount(torch.arange(10).repeat(3), minlength=10)
    assert math.isclose(perplexity(uniform).item(), 10.0, rel_tol=1e-5)
    assert math.isclose(
        perplexity(torch.bincount(torch.zeros(20, dtype=torch.long), minlength=10)).item(), 1.0, rel_tol=1e-6
    )
    assert math.isclose(perplexity(torch.tensor([2.0, 2.0] + [0.0] * 8)).item(), 2.0, rel_tol=1e-5)
    skewed = torch.tensor([3.0, 1.0], dtype=torch.float64)
    assert math.isclose(
        perplexity(skewed).item(), math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel_tol=1e-12
    )
    assert perplexity(skewed).dtype == torch.float64
    assert perplexity(torch.zeros(5)).item() == 0.0


def _one_hot_codebook_quantizer(k: int, window: int) -> GradientVectorQuantizer:
    q = GradientVectorQuantizer(2, k, k, usage_window=window)
    with torch.no_grad():
        q.weight.copy_(10 * torch.eye(k))
    return q


def _batch_of_code(code: int, k: int) -> torch.Tensor:
    """A [1, K, 2, 2] map whose four vectors all sit on code ``code``."""
    return (10 * torch.eye(k))[code].view(1, k, 1, 1).expand(1, k, 2, 2).contiguous()


def test_perplexity_and_usage_when_all_codes_used_equally() -> None:
    k = 8
    q = _one_hot_codebook_quantizer(k, window=4).eval()
    z = (10 * torch.eye(k)).t().reshape(1, k, 2, 4)  # each code exactly once
    out = q(z)
    assert torch.equal(out.indices.reshape(-1), torch.arange(k))
    assert math.isclose(out.perplexity.item(), k, rel_tol=1e-5)
    assert out.usage.item() == 1.0


def test_usage_window() -> None:
    k = 4
    q = _one_hot_codebook_quantizer(k, window=3).train()
    got = [q(_batch_of_code(c, k)).usage.item() for c in (0, 1, 2, 3, 3, 3)]
    # windows: {0}, {0,1}, {0,1,2}, {1,2,3}, {2,3}, {3}
    assert got == [0.25, 0.5, 0.75, 0.75, 0.5, 0.25]
    # eval mode reports this batch only and leaves the window alone
    step = int(q.usage_step)
    q.eval()
    assert q(_batch_of_code(1, k)).usage.item() == 0.25
    assert int(q.usage_step) == step
    q.train()
    assert q(_batch_of_code(2, k)).usage.item() == 0.5  # window {3, 3, 2}


# ---------------------------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize(
    "quantizer, spatial_dims, shape",
    [("ema", 2, (2, 1, 18, 22)), ("ema", 2, (1, 1, 64, 72)), ("gradient", 3, (1, 1, 10, 9, 12))],
)
def test_reconstruction_network_torchscript_matches_eager(quantizer: str, spatial_dims: int, shape: tuple) -> None:
    torch.manual_seed(14)
    model = VQVAE(
        spatial_dims, 1, channels=(4, 8), num_res_units=1, num_embeddings=256, embedding_dim=4, quantizer=quantizer
    )
    x = torch.rand(*shape)
    model.train()
    model(x)  # one training step: data-initialise the EMA codebook
    net = ReconstructionNetwork(model).eval()
    scripted = torch.jit.script(net)
    with torch.no_grad():
        eager_out, scripted_out = net(x), scripted(x)
    assert eager_out.shape == x.shape
    assert torch.equal(scripted_out, eager_out)
