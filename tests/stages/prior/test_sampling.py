"""``draw_codes``: the plain draw, top-k and nucleus (top-p) truncation (the sampler's settings: test_generate.py)."""

from __future__ import annotations

import torch

from vqvae_medical.stages.prior.sampling import draw_codes

#: one row, five codes with probabilities 0.4, 0.3, 0.15, 0.1, 0.05
PROBS = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])


def _frequencies(n: int = 20000, **truncation) -> torch.Tensor:
    logits = PROBS.log().expand(n, -1)
    drawn = draw_codes(logits, 1.0, torch.Generator().manual_seed(0), **truncation)
    return torch.bincount(drawn, minlength=PROBS.shape[1]).float() / n


def test_plain_draw_follows_the_softmax():
    torch.testing.assert_close(_frequencies(), PROBS[0], atol=0.015, rtol=0)


def test_top_k_draws_from_the_k_most_likely_renormalised():
    freq = _frequencies(top_k=2)
    assert freq[2:].sum() == 0
    torch.testing.assert_close(freq[:2], torch.tensor([0.4, 0.3]) / 0.7, atol=0.015, rtol=0)
    assert torch.equal(_frequencies(200, top_k=1), torch.tensor([1.0, 0, 0, 0, 0]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.4 + 0.3 = 0.7 < 0.8, so the nucleus of 0.8 is the first three codes (0.85); 0.7 exactly is two codes
    freq = _frequencies(top_p=0.8)
    assert freq[3:].sum() == 0
    torch.testing.assert_close(freq[:3], torch.tensor([0.4, 0.3, 0.15]) / 0.85, atol=0.015, rtol=0)
    assert _frequencies(top_p=0.7)[2:].sum() == 0
    assert torch.equal(_frequencies(200, top_p=0.01), torch.tensor([1.0, 0, 0, 0, 0]))  # the most likely stays


def test_top_p_is_applied_per_row_in_the_rows_own_order():
    logits = torch.stack([PROBS[0], PROBS[0].flip(0)]).log().repeat(500, 1)
    drawn = draw_codes(logits, 1.0, torch.Generator().manual_seed(1), top_p=0.5).view(500, 2)
    assert set(drawn[:, 0].tolist()) == {0, 1} and set(drawn[:, 1].tolist()) == {4, 3}


def test_both_off_draw_the_same_codes_as_the_plain_draw():
    logits = torch.randn(64, 16)
    plain = draw_codes(logits, 0.9, torch.Generator().manual_seed(2))
    same = draw_codes(logits, 0.9, torch.Generator().manual_seed(2), top_k=0, top_p=1.0)
    assert torch.equal(plain, same)
