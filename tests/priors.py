"""What the prior network tests share (``test_pixelcnn.py``, ``test_transformer_prior.py``): the codebook size, the
conditioning configurations of a prior, seeded random inputs for each, and the checks of raster sampling
(``stages.prior.sampling.sample``) that every prior network must pass."""

from __future__ import annotations

import torch

from vqvae_medical.networks import prior_cross_entropy
from vqvae_medical.stages.prior.sampling import sample

__all__ = ["CONFIGS", "K", "check_cached_sampling", "check_global_generator_and_int_label", "fit", "prior_inputs"]

K = 20  # codes
#: keyword arguments of a prior network per conditioning: none, a class, a spatial condition, top codes and a class
CONFIGS = {
    "plain": {},
    "class": {"num_classes": 3},
    "spatial": {"conditioning_channels": 5},
    "topcodes_class": {"conditioning_num_embeddings": 7, "conditioning_channels": 4, "num_classes": 3},
}


def prior_inputs(config: str, b: int, h: int, w: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random codes ``[b, h, w]``, class labels and spatial condition (``dtype``) for a config of ``CONFIGS``."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, K, (b, h, w), generator=g)
    kw = CONFIGS[config]
    label = torch.randint(0, kw["num_classes"], (b,), generator=g) if "num_classes" in kw else None
    cond = None
    if "conditioning_num_embeddings" in kw:
        cond = torch.randint(0, kw["conditioning_num_embeddings"], (b, (h + 1) // 2, (w + 1) // 2), generator=g)
    elif "conditioning_channels" in kw:
        cond = torch.randn(b, kw["conditioning_channels"], h, w, generator=g).to(dtype)
    return codes, label, cond


def check_cached_sampling(model, shape, label, cond, runs, note: str = "") -> None:
    """For each ``(seed, temperature)`` of ``runs``: cached sampling draws exactly the codes of naive sampling (the
    whole network at every position) from generators with the same seed."""
    for seed, temperature in runs:
        gens = [torch.Generator().manual_seed(seed) for _ in range(2)]
        cached = sample(model, shape, label, cond, temperature, gens[0], cached=True)
        naive = sample(model, shape, label, cond, temperature, gens[1], cached=False)
        assert cached.dtype == torch.long and cached.shape == tuple(shape)
        assert torch.equal(cached, naive), f"seed {seed}{note}"


def check_global_generator_and_int_label(model) -> None:
    """Without a generator, sampling draws from torch's global one; an int class label is that class for every
    sample."""
    torch.manual_seed(3)
    a = sample(model, (2, 4, 5), class_label=1, cached=True)
    torch.manual_seed(3)
    b = sample(model, (2, 4, 5), class_label=torch.tensor([1, 1]), cached=False)
    assert torch.equal(a, b)


def fit(model, batch, steps: int, batch_size: int, lr: float) -> None:
    """``steps`` Adam steps (learning rate ``lr``) of ``model``'s cross-entropy on fresh code maps
    ``batch(batch_size)``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        codes = batch(batch_size)
        loss = prior_cross_entropy(model(codes), codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
