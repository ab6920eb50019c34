"""Gated PixelCNN prior: causality without blind spot, cached == naive sampling, loss helpers, TorchScript, training."""

from __future__ import annotations

import math

import pytest
import torch
from priors import CONFIGS, K, check_cached_sampling, check_global_generator_and_int_label, fit, prior_inputs

from vqvae_medical.networks.pixelcnn import (
    GatedPixelCNN,
    PixelCNNCache,
    bits_per_code,
    prior_cross_entropy,
)
from vqvae_medical.stages.prior.sampling import draw_codes, sample

pytestmark = pytest.mark.usefixtures("single_thread")


def _make(config: str, num_layers: int = 3, kernel_size: int = 3, channels: int = 16, seed: int = 0) -> GatedPixelCNN:
    torch.manual_seed(seed)
    return GatedPixelCNN(2, K, channels, num_layers, kernel_size, **CONFIGS[config])


def _expected_field(h: int, w: int, r: int, c: int, reach: int) -> torch.Tensor:
    """Positions the logits at ``(r, c)`` must depend on: the rectangle above and the row to the left, clipped."""
    field = torch.zeros(h, w, dtype=torch.bool)
    field[max(r - 1 - reach, 0) : r, max(c - reach, 0) : c + reach + 1] = True
    field[r, max(c - reach, 0) : c] = True
    return field


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("num_layers,kernel_size", [(1, 3), (3, 3), (2, 5)])
def test_causal_without_blind_spot(config, num_layers, kernel_size):
    """The logits at (r, c) depend exactly on the earlier positions of the receptive field (every layer and stack):
    nothing at or after (r, c) in raster order, nothing of another batch item, everything before it in reach,
    including the positions up-right of (r, c) that a blind spot would miss."""
    model = _make(config, num_layers, kernel_size).double()
    h, w = 12, 11
    codes, label, cond = prior_inputs(config, 2, h, w)
    if cond is not None and cond.is_floating_point():
        cond = cond.double()
    captured = []

    def keep(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    hook = model.embedding.register_forward_hook(keep)
    try:
        logits = model(codes, label, cond)
    finally:
        hook.remove()
    emb = captured[0]
    proj = torch.randn(K, dtype=torch.float64)
    reach = model.receptive_field
    for r, c in [(6, 5), (0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (1, w - 2), (7, 1)]:
        emb.grad = None
        (logits[0, :, r, c] @ proj).backward(retain_graph=True)
        grad = emb.grad.abs().sum(-1)  # [B, H, W]
        assert not grad[1].any(), "batch items must be independent"
        depends = grad[0] > 0
        expected = _expected_field(h, w, r, c, reach)
        assert torch.equal(depends, expected), f"receptive field at {(r, c)}:\n{depends.int()}\n!=\n{expected.int()}"
        if 0 < r and c + 1 < w:
            assert depends[r - 1, c + 1 : c + reach + 1].all(), "blind spot up-right"


@pytest.mark.parametrize("config", list(CONFIGS))
def test_later_codes_do_not_change_logits(config):
    """Float32 forward: replacing the code at (r, c) and everything after it leaves the logits at (r, c) unchanged;
    the class label and spatial condition do change them."""
    model = _make(config, num_layers=4)
    h, w = 9, 8
    codes, label, cond = prior_inputs(config, 2, h, w)
    base = model(codes, label, cond)
    flat = codes.flatten(1).clone()
    for pos in [0, 13, 40, h * w - 1]:
        r, c = divmod(pos, w)
        other = flat.clone()
        other[:, pos:] = torch.randint(0, K, other[:, pos:].shape)
        out = model(other.view_as(codes), label, cond)
        torch.testing.assert_close(out[:, :, r, c], base[:, :, r, c], rtol=0, atol=1e-6)
    if label is not None:
        assert not torch.allclose(model(codes, (label + 1) % 3, cond), base)
    if cond is not None:
        other_cond = (cond + 1) % 7 if not cond.is_floating_point() else torch.randn_like(cond)
        assert not torch.allclose(model(codes, label, other_cond), base)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_cache_logits_match_full_forward(config):
    """Teacher-forced incremental logits equal the full forward's at every position."""
    model = _make(config, num_layers=3, kernel_size=5)
    b, h, w = 2, 7, 6
    codes, label, cond = prior_inputs(config, b, h, w)
    with torch.no_grad():
        full = model(codes, label, cond)
        cache = PixelCNNCache(model, b, h, w, label, cond)
        for r in range(h):
            for c in range(w):
                torch.testing.assert_close(cache.next_logits(), full[:, :, r, c], rtol=0, atol=1e-5)
                cache.append(codes[:, r, c])
        with pytest.raises(ValueError):
            cache.next_logits()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_cached_sampling_equals_naive(config, temperature):
    model = _make(config, num_layers=3)
    b, h, w = 3, 6, 7
    _, label, cond = prior_inputs(config, b, h, w, seed=5)
    check_cached_sampling(model, (b, h, w), label, cond, [(seed, temperature) for seed in (0, 1, 2)])


def test_sampling_global_generator_and_int_label():
    check_global_generator_and_int_label(_make("class", num_layers=2))


def test_low_temperature_is_near_greedy():
    model = _make("plain", num_layers=2)
    codes = sample(model, (2, 4, 4), temperature=1e-4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(codes)
    assert torch.equal(codes, logits.argmax(1))


def test_bits_per_code_and_cross_entropy():
    codes = torch.randint(0, K, (2, 3, 4))
    uniform = torch.zeros(2, K, 3, 4)
    assert bits_per_code(uniform, codes).item() == pytest.approx(math.log2(K), rel=1e-6)
    logits = torch.randn(2, K, 3, 4)
    manual = -torch.log_softmax(logits, 1).gather(1, codes[:, None]).mean()
    assert prior_cross_entropy(logits, codes).item() == pytest.approx(manual.item(), rel=1e-6)
    assert bits_per_code(logits, codes).item() == pytest.approx(manual.item() / math.log(2), rel=1e-6)
    with pytest.raises(ValueError):
        bits_per_code(logits, codes[:, :2])


@pytest.mark.parametrize("config", ["plain", "topcodes_class"])
def test_torchscript(config):
    model = _make(config)
    scripted = torch.jit.script(model)
    codes, label, cond = prior_inputs(config, 2, 5, 6)
    torch.testing.assert_close(scripted(codes, label, cond), model(codes, label, cond), rtol=0, atol=0)
    if config == "plain":  # one tensor in, one tensor out: usable as a bundle's network_def
        assert scripted(codes).shape == (2, K, 5, 6)
    else:
        with pytest.raises(Exception, match="class_label is required"):
            scripted(codes)


def test_argument_errors():
    with pytest.raises(ValueError, match="2D only"):
        GatedPixelCNN(3, K)
    with pytest.raises(ValueError, match="kernel_size"):
        GatedPixelCNN(2, K, kernel_size=4)
    model = _make("spatial")
    codes, _, cond = prior_inputs("spatial", 2, 5, 6)
    with pytest.raises(ValueError, match="condition is required"):
        model(codes)
    with pytest.raises(ValueError, match="spatial size"):
        model(codes, None, cond[:, :, :4])
    with pytest.raises(ValueError, match="class_label"):
        model(codes, torch.zeros(2, dtype=torch.long), cond)
    with pytest.raises(ValueError, match="int64"):
        model(codes.float(), None, cond)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, (2, 5, 6), condition=cond, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        sample(model, (5, 6), condition=cond)
    with pytest.raises(ValueError, match="batch size"):
        sample(model, (3, 5, 6), condition=cond)


def test_draw_codes_shape():
    out = draw_codes(torch.randn(4, K), 1.0, torch.Generator().manual_seed(0))
    assert out.shape == (4,) and out.dtype == torch.long


def test_training_lowers_bits_per_code():
    """~50 Adam steps on stripe maps (two random codes alternating every two columns) fall far below log2 K."""
    torch.manual_seed(0)
    num_codes = 16
    model = GatedPixelCNN(2, num_codes, channels=32, num_layers=3, kernel_size=3)

    def batch(n: int) -> torch.Tensor:
        pair = torch.stack([torch.randperm(num_codes)[:2] for _ in range(n)])  # [n, 2]
        phase = ((torch.arange(8) // 2) % 2)[None].expand(n, 8)  # [n, W]
        row = pair.gather(1, phase)  # [n, W]
        return row[:, None, :].expand(n, 8, 8).contiguous()

    val = batch(64)
    with torch.no_grad():
        start = bits_per_code(model(val), val).item()
    fit(model, batch, steps=50, batch_size=32, lr=5e-3)
    with torch.no_grad():
        end = bits_per_code(model(val), val).item()
    assert start > 0.9 * math.log2(num_codes)
    assert end < 0.35 * math.log2(num_codes), (start, end)
