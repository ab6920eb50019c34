"""Causal transformer prior: raster-order causality with global reach, conditioning, cached == naive sampling,
TorchScript behind PriorNetwork, training."""

from __future__ import annotations

import io
import math

import pytest
import torch
from priors import CONFIGS, K, check_cached_sampling, check_global_generator_and_int_label, fit, prior_inputs

from vqvae_medical.networks import (
    GatedPixelCNN,
    TransformerPrior,
    TransformerPriorCache,
    bits_per_code,
)
from vqvae_medical.stages.prior.network import PriorNetwork, pack_inputs, prior_of

pytestmark = pytest.mark.usefixtures("single_thread")


def _make(config: str, flash: bool = False, num_layers: int = 2, double: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = TransformerPrior(
        2,
        K,
        max_seq_len=64,
        channels=16,
        num_layers=num_layers,
        num_heads=4,
        use_flash_attention=flash,
        **CONFIGS[config],
    )
    return (model.double() if double else model).eval()


def _inputs(config: str, b: int, h: int, w: int, seed: int = 0, double: bool = True):
    """:func:`prior_inputs`, the spatial condition in double precision unless ``double`` is off."""
    return prior_inputs(config, b, h, w, seed, torch.float64 if double else torch.float32)


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_raster_causality_and_global_reach(config, flash):
    """Replacing the codes from (r, c) on never changes the logits at (r, c); the first code changes the last logits
    (global context, unlike a PixelCNN's window); the class and the condition change the logits."""
    model = _make(config, flash)
    h, w = 6, 7
    codes, label, cond = _inputs(config, 2, h, w)
    with torch.no_grad():
        base = model(codes, label, cond)
        assert base.shape == (2, K, h, w) and base.dtype == torch.float64
        flat = codes.flatten(1)
        g = torch.Generator().manual_seed(1)
        for pos in [0, 1, 9, 23, h * w - 1]:
            other = flat.clone()
            other[:, pos:] = (other[:, pos:] + torch.randint(1, K, other[:, pos:].shape, generator=g)) % K
            out = model(other.view_as(codes), label, cond)
            torch.testing.assert_close(
                out.flatten(2)[:, :, : pos + 1], base.flatten(2)[:, :, : pos + 1], rtol=0, atol=1e-12
            )
            if pos + 1 < h * w:  # the first changed code is seen by the next position
                assert not torch.allclose(out.flatten(2)[:, :, pos + 1], base.flatten(2)[:, :, pos + 1])
        first = codes.clone()
        first[:, 0, 0] = (first[:, 0, 0] + 1) % K
        assert not torch.allclose(model(first, label, cond)[:, :, -1, -1], base[:, :, -1, -1])
        if label is not None:
            assert not torch.allclose(model(codes, (label + 1) % 3, cond)[:, :, 0, 0], base[:, :, 0, 0])
        if cond is not None and cond.is_floating_point():
            # the condition at position p enters the step that predicts p: it changes the logits from p on only
            p = 17
            other_cond = cond.clone()
            other_cond[:, :, p // w, p % w] += 1.0
            out = model(codes, label, other_cond).flatten(2)
            torch.testing.assert_close(out[:, :, :p], base.flatten(2)[:, :, :p], rtol=0, atol=1e-12)
            assert not torch.allclose(out[:, :, p], base.flatten(2)[:, :, p])
        elif cond is not None:
            assert not torch.allclose(model(codes, label, (cond + 1) % 7), base)


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cache_logits_match_full_forward(config, flash):
    """Teacher-forced key/value-cached logits equal the full forward's at every position (float64 and float32)."""
    for double, atol in [(True, 1e-12), (False, 1e-5)]:
        model = _make(config, flash, num_layers=3, double=double)
        b, h, w = 2, 5, 6
        codes, label, cond = _inputs(config, b, h, w, double=double)
        with torch.no_grad():
            full = model(codes, label, cond)
            cache = TransformerPriorCache(model, b, h, w, label, cond)
            for r in range(h):
                for c in range(w):
                    logits = cache.next_logits()
                    assert logits.shape == (b, K)
                    torch.testing.assert_close(logits, full[:, :, r, c], rtol=0, atol=atol)
                    cache.append(codes[:, r, c])
            with pytest.raises(ValueError, match="complete"):
                cache.next_logits()


def test_cache_append_without_reading_logits():
    """append() alone (teacher forcing without reading the logits) keeps the key/value cache complete."""
    model = _make("class")
    codes, label, _ = _inputs("class", 2, 4, 5)
    with torch.no_grad():
        full = model(codes, label)
        cache = TransformerPriorCache(model, 2, 4, 5, label)
        for i in range(19):
            cache.append(codes.flatten(1)[:, i])
        torch.testing.assert_close(cache.next_logits(), full[:, :, 3, 4], rtol=0, atol=1e-12)


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cached_sampling_equals_naive(config, flash):
    """Same generator, same samples: float64 at temperatures 1 and 0.5, float32 (the default dtype) at 2."""
    b, h, w = 3, 5, 6
    for double, runs in [(True, [(0, 1.0), (1, 0.5)]), (False, [(2, 2.0)])]:
        model = _make(config, flash, double=double)
        _, label, cond = _inputs(config, b, h, w, seed=5, double=double)
        check_cached_sampling(model, (b, h, w), label, cond, runs, f", double {double}")


def test_sampling_global_generator_and_int_label():
    check_global_generator_and_int_label(_make("class", double=False))


def test_state_dict_has_weights_only_and_prior_network_keys():
    """The blocks' causal masks (max_seq_len ** 2 each) stay out of the checkpoint; PriorNetwork keys are model.*."""
    model = TransformerPrior(2, K, max_seq_len=256, channels=16, num_layers=2, num_heads=4, num_classes=2)
    keys = list(model.state_dict())
    assert not any("causal_mask" in k for k in keys)
    assert "transformer.token_embeddings.weight" in keys
    assert model.state_dict()["transformer.token_embeddings.weight"].shape == (K + 2, 16)
    net = PriorNetwork(model)
    assert all(k.startswith("model.") for k in net.state_dict())
    assert prior_of(net) is model
    fresh = PriorNetwork(TransformerPrior(2, K, max_seq_len=256, channels=16, num_layers=2, num_heads=4, num_classes=2))
    fresh.load_state_dict(net.state_dict())  # strict: masks are rebuilt, not loaded
    x = pack_inputs(torch.randint(0, K, (2, 8, 8)), torch.tensor([0, 1]))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), net.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("flash", [False, True])
def test_prior_network_torchscript(flash):
    """PriorNetwork(TransformerPrior) scripts (as the Model Zoo's ckpt_export does), saves, loads and matches eager."""
    torch.manual_seed(0)
    net = PriorNetwork(
        TransformerPrior(
            2, K, max_seq_len=64, channels=16, num_layers=2, num_heads=4, num_classes=3, use_flash_attention=flash
        )
    ).eval()
    scripted = torch.jit.script(net)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    codes = torch.randint(0, K, (2, 7, 8), generator=torch.Generator().manual_seed(0))
    x = pack_inputs(codes, torch.tensor([0, 2]))
    with torch.no_grad():
        eager = net(x)
        assert eager.shape == (2, K, 7, 8)
        torch.testing.assert_close(scripted(x), eager, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), eager, rtol=0, atol=0)
        assert not torch.equal(net(pack_inputs(codes, torch.tensor([1, 1]))), eager)
    plain = PriorNetwork(TransformerPrior(2, K, max_seq_len=64, channels=16, num_layers=1, num_heads=2)).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(plain)(codes.float()[:, None]), plain(codes.float()[:, None]))


def test_argument_errors():
    with pytest.raises(ValueError, match="2D only"):
        TransformerPrior(3, K)
    with pytest.raises(ValueError, match="divisible"):
        TransformerPrior(2, K, channels=18, num_heads=4)
    model = _make("topcodes_class", double=False)
    codes, label, cond = _inputs("topcodes_class", 2, 5, 6)
    with pytest.raises(ValueError, match="class_label is required"):
        model(codes, None, cond)
    with pytest.raises(ValueError, match="condition is required"):
        model(codes, label)
    with pytest.raises(ValueError, match="int64"):
        model(codes.float(), label, cond)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(2, 9, 8, dtype=torch.long), label, cond)
    with pytest.raises(ValueError, match="max_seq_len"):
        TransformerPriorCache(model, 2, 9, 8, label, cond)
    plain = _make("plain", double=False)
    with pytest.raises(ValueError, match="no class conditioning"):
        plain(codes, label)
    with pytest.raises(ValueError, match="no spatial conditioning"):
        plain(codes, None, cond)
    with pytest.raises(ValueError, match="spatially conditioned"):
        PriorNetwork(model)


def test_training_lowers_bits_per_code_with_long_range_context():
    """60 Adam steps on maps of random codes whose last row repeats the first row: the transformer learns the copy
    from three rows up (its other rows stay at log2 K bits, being random)."""
    torch.manual_seed(0)
    num_codes, h, w = 16, 4, 4
    model = TransformerPrior(2, num_codes, max_seq_len=h * w, channels=32, num_layers=2, num_heads=4)

    def batch(n: int) -> torch.Tensor:
        codes = torch.randint(0, num_codes, (n, h, w))
        codes[:, -1] = codes[:, 0]
        return codes

    val = batch(128)

    def last_row_bits() -> float:
        with torch.no_grad():
            return bits_per_code(model(val)[:, :, -1], val[:, -1]).item()

    start = last_row_bits()
    fit(model, batch, steps=60, batch_size=64, lr=1e-2)
    end = last_row_bits()
    with torch.no_grad():
        other_rows = bits_per_code(model(val)[:, :, :-1], val[:, :-1]).item()
    assert start > 0.9 * math.log2(num_codes)
    assert end < 0.25 * math.log2(num_codes), (start, end)
    assert other_rows > 0.9 * math.log2(num_codes)
    assert isinstance(prior_of(model), TransformerPrior) and not isinstance(model, GatedPixelCNN)


def test_load_prior_names_the_overlay_or_max_seq_len(tmp_path):
    """A checkpoint of the other prior network (the default changed from gated PixelCNN to transformer in
    pixelcnn_prior 0.4.0), or of a transformer with another max_seq_len, stops with the overlay or the setting."""
    from vqvae_medical.stages.prior.network import load_prior
    from vqvae_medical.utils.io import CheckpointError

    def transformer(max_seq_len: int) -> PriorNetwork:
        return PriorNetwork(TransformerPrior(2, K, max_seq_len=max_seq_len, channels=8, num_layers=1, num_heads=2))

    gated = PriorNetwork(GatedPixelCNN(2, K, 8, 2))
    torch.save(gated.state_dict(), tmp_path / "gated.pt")
    torch.save(transformer(64).state_dict(), tmp_path / "transformer.pt")
    with pytest.raises(CheckpointError, match="holds a gated PixelCNN prior .* add configs/gated.json") as info:
        load_prior(transformer(64), tmp_path / "gated.pt")
    assert str(tmp_path / "gated.pt") in str(info.value)
    with pytest.raises(CheckpointError, match="holds a transformer prior .* leave out configs/gated.json"):
        load_prior(gated, tmp_path / "transformer.pt")
    with pytest.raises(CheckpointError, match="max_seq_len is 64 in the checkpoint and 32 here: pass --max_seq_len 64"):
        load_prior(transformer(32), tmp_path / "transformer.pt")
    assert not load_prior(transformer(64), tmp_path / "transformer.pt").training


def test_check_sequence_length_of_the_one_level_and_the_top_prior():
    """The transformer's position table against the autoencoder's code map: the one-level prior against the map,
    a VQ-VAE-2 top prior against the top map; a gated PixelCNN has no limit."""
    from vqvae_medical.networks import VQVAE, VQVAE2
    from vqvae_medical.stages.frozen import FrozenAutoencoder
    from vqvae_medical.stages.prior.hierarchical import HierarchicalPrior
    from vqvae_medical.stages.prior.network import check_sequence_length
    from vqvae_medical.training.runtime import SettingError

    tiny = {"channels": (8, 16), "num_res_units": 1, "res_channels": (8, 8)}
    vq = FrozenAutoencoder(VQVAE(2, 1, num_embeddings=K, embedding_dim=8, **tiny), record={"image_size": [64, 64]})
    one_level = PriorNetwork(TransformerPrior(2, K, max_seq_len=256, channels=8, num_layers=1, num_heads=2))
    assert check_sequence_length(one_level, vq) and check_sequence_length(PriorNetwork(GatedPixelCNN(2, K, 8, 2)), vq)
    with pytest.raises(SettingError, match=r"max_seq_len is 256, .* 32 x 32 = 1024 positions: set --max_seq_len 1024"):
        check_sequence_length(one_level, vq, [128, 128])
    vq2 = FrozenAutoencoder(
        VQVAE2(2, 1, channels=(8, 16), num_res_units=1, num_embeddings=8, embedding_dim=4),
        record={"image_size": [64, 64]},
    )
    top = TransformerPrior(2, 8, max_seq_len=64, channels=8, num_layers=1, num_heads=2)
    bottom = GatedPixelCNN(2, 8, 8, 1, conditioning_num_embeddings=8)
    hierarchy = HierarchicalPrior(top, bottom)
    assert check_sequence_length(hierarchy, vq2)  # top map 8 x 8 (the bottom map's 256 positions do not count)
    with pytest.raises(SettingError, match=r"16 x 16 = 256 positions: set --max_seq_len 256 .*vqvae2_gated_top.json"):
        check_sequence_length(hierarchy, vq2, [128, 128])


def test_every_parameter_gets_a_gradient_and_old_checkpoints_load():
    """No parameter without a gradient (DistributedDataParallel refuses those; MONAI's blocks build an unused
    cross-attention LayerNorm, which the prior drops), and a checkpoint that still holds those norms loads."""
    net = PriorNetwork(TransformerPrior(2, K, max_seq_len=64, channels=8, num_layers=2, num_heads=2, num_classes=3))
    net(pack_inputs(torch.randint(0, K, (2, 8, 8)), torch.tensor([0, 2]))).sum().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    old = dict(net.state_dict())
    for i in range(2):
        old[f"model.transformer.blocks.{i}.norm_cross_attn.weight"] = torch.ones(8)
        old[f"model.transformer.blocks.{i}.norm_cross_attn.bias"] = torch.zeros(8)
    net.load_state_dict(old)
