"""Training options of the autoencoder bundles: the SSIM loss term, the clamped reconstruction the losses score,
and the cosine learning-rate decay."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.losses import SSIMLoss
from monai.transforms import Compose, Lambdad

from vqvae_medical.data import build_datalist, image_transforms_2d
from vqvae_medical.networks import VQVAE
from vqvae_medical.stages.autoencoder.steps import VQTrainStep, training_scalars
from vqvae_medical.training.handlers import TimeBudget
from vqvae_medical.training.schedules import cosine_decay
from vqvae_medical.training.steps import NonFiniteLossError


def test_cosine_decay_over_epochs():
    factor = cosine_decay(10, final_factor=0.01)
    values = [factor(e) for e in range(11)]
    assert values[0] == pytest.approx(1.0)
    assert values[5] == pytest.approx(0.505)
    assert values[10] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert factor(50) == pytest.approx(0.01)  # epochs past the end (a resumed run with more epochs) stay at the end
    assert cosine_decay(10, final_factor=1.0)(7) == 1.0


def test_cosine_decay_follows_the_time_budget():
    budget = TimeBudget(minutes=2.0)
    factor = cosine_decay(1000, time_budget=budget, final_factor=0.0)
    assert factor(1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 1000)))
    budget.spent_s = 60.0  # half of the budget, far ahead of 1 epoch of 1000
    assert budget.fraction_spent == pytest.approx(0.5)
    assert factor(1) == pytest.approx(0.5)
    budget.spent_s = 130.0
    assert factor(2) == pytest.approx(0.0)
    assert TimeBudget(minutes=None).fraction_spent == 0.0


@pytest.mark.parametrize("minutes", ["null", "30", -1.0, [5]])
def test_time_budget_rejects_what_is_not_a_number_of_minutes(minutes):
    """``--time_budget_minutes null`` on MONAI's command line arrives as the text 'null': one message that says to
    write 0, instead of a float conversion error deep in the learning-rate scheduler."""
    with pytest.raises(ValueError, match="time_budget_minutes must be") as info:
        TimeBudget(minutes=minutes)
    assert ("write 0 for no budget" in str(info.value)) == isinstance(minutes, str)


@pytest.mark.parametrize("kwargs", [{"max_epochs": 0}, {"max_epochs": 5, "final_factor": 1.5}])
def test_cosine_decay_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        cosine_decay(**kwargs)


def test_cosine_scheduler_state_loads_weights_only():
    """The scheduler's state goes into the bundles' checkpoints, which load with ``weights_only=True``."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_decay(4, TimeBudget(minutes=1.0)))
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = torch.optim.lr_scheduler.LambdaLR(torch.optim.Adam([param], lr=1e-3), cosine_decay(4))
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.505e-3)


def test_ssim_weight_must_not_be_negative():
    with pytest.raises(ValueError, match="ssim_weight"):
        VQTrainStep(ssim_weight=-1.0)


def _one_training_iteration(
    brain_dir, step: VQTrainStep, hooks=None, attach=None, transform=None
) -> tuple[SupervisedTrainer, VQVAE]:
    """One real trainer iteration of ``step`` on a batch of 4 brain slices (64 x 64) with a tiny 2D VQ-VAE;
    ``hooks(network)`` runs before training, ``attach(trainer)`` before the run; ``transform`` follows the loading."""
    items = build_datalist(brain_dir, layout="folder", val_fraction=0.0, test_fraction=0.0)["training"][:4]
    load = image_transforms_2d(channels=1, spatial_size=(64, 64), resize_mode="resize")
    dataset = Dataset(items, transform=load if transform is None else Compose([load, transform]))
    torch.manual_seed(0)
    network = VQVAE(2, 1, 1, channels=(8, 16), num_res_units=1, res_channels=(8, 8), num_embeddings=16, embedding_dim=8)
    if hooks is not None:
        hooks(network)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(dataset, batch_size=4),
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-3),
        loss_function=torch.nn.L1Loss(),
        iteration_update=step,
        decollate=False,
    )
    if attach is not None:
        attach(trainer)
    trainer.run()
    return trainer, network


def test_ssim_term_is_added_to_the_training_loss(brain_dir):
    """One real trainer iteration on brain slices: the loss is recon + quantizer + ssim_weight * (1 - SSIM)."""
    trainer, _ = _one_training_iteration(brain_dir, VQTrainStep(ssim_weight=0.5))
    out = trainer.state.output
    ssim_term = SSIMLoss(spatial_dims=2, data_range=1.0)(out["pred"].float(), out["image"].float())
    assert 0.0 < ssim_term.item() <= 1.0
    expected = out["recon_loss"] + out["quantizer_loss"] + out["range_loss"] + 0.5 * ssim_term
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("range_weight", [0.0, 1.0, 3.0])
def test_range_term_pulls_the_raw_output_back_into_the_clip_range(brain_dir, range_weight):
    """A real slice reconstructed perfectly except for its background, which the decoder put at -0.5: clamped to
    [0, 1] that is still perfect, so with ``range_weight=0`` nothing pulls those pixels back (the ratchet behind the
    latent drift); with a weight the loss grows by ``range_weight * mean((y - clamp(y))^2)`` and its gradient raises
    exactly those pixels."""
    path = sorted(brain_dir.rglob("*.jpg"))[0]
    image = image_transforms_2d(channels=1)({"image": str(path)})["image"].as_tensor()[None]
    background = image <= 0
    assert 0.1 < background.float().mean() < 0.9
    raw = torch.where(background, torch.full_like(image, -0.5), image).requires_grad_(True)
    step = VQTrainStep(ssim_weight=1.0, range_weight=range_weight)
    loss, terms = step.compute_loss({"image": image, "pred": raw, "quantizer_loss": torch.tensor(0.0)})
    expected_range = 0.25 * background.float().mean()
    assert terms["range_loss"].item() == pytest.approx(expected_range.item(), rel=1e-5)
    assert loss.item() == pytest.approx(range_weight * expected_range.item(), abs=1e-5)
    loss.backward()
    grad, pull = raw.grad[background], -range_weight / image.numel()  # d/dy of w * mean((y - 0)^2) at y = -0.5
    assert torch.allclose(grad, torch.full_like(grad, pull), atol=1e-7)  # 0 without the term (rounding noise aside)
    assert raw.grad[~background].abs().max() < 1e-7  # pull is -6e-5 per pixel here


def test_range_weight_must_not_be_negative():
    with pytest.raises(ValueError, match="range_weight must be >= 0"):
        VQTrainStep(range_weight=-1.0)


def test_training_scalars_keeps_scalars_without_autograd_warnings():
    weight = torch.ones(1, requires_grad=True)
    output = {"loss": (weight * 2).sum(), "usage": torch.tensor(0.5), "image": torch.rand(2, 1, 4, 4), "name": "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scalars = training_scalars(output)
    assert scalars == {"loss": 2.0, "usage": 0.5}


def test_ssim_term_uses_the_configured_window(brain_dir):
    """The 3D bundle gives the training term the evaluation metric's window (``ssim_win_size``)."""
    path = sorted(brain_dir.rglob("*.jpg"))[0]
    image = image_transforms_2d(channels=1)({"image": str(path)})["image"].as_tensor()[None]
    blurred = torch.nn.functional.avg_pool2d(image, 3, stride=1, padding=1)
    step = VQTrainStep(ssim_weight=1.0, ssim_win_size=7)
    expected = SSIMLoss(spatial_dims=2, data_range=1.0, win_size=7)(blurred, image)
    assert step._ssim_loss(blurred, image).item() == pytest.approx(expected.item(), abs=1e-5)
    assert step._ssim_loss(blurred, image).item() != pytest.approx(
        VQTrainStep(ssim_weight=1.0)._ssim_loss(blurred, image).item(), abs=1e-5
    )


def test_cpu_bf16_runs_the_network_in_bf16_and_the_losses_in_fp32(brain_dir):
    """``cpu_bf16``: convolutions see bf16 under CPU autocast, the quantizer and the loss stay fp32, weights update.
    ``"force"``, so that it runs on every CPU (``True`` is fp32 without native bf16:
    ``tests/training/test_runtime_cpu_bf16.py``)."""
    conv_dtypes, quantizer_dtypes, before = set(), set(), []

    def hooks(network):
        for module in network.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(lambda m, i, o: conv_dtypes.add(o.dtype))
        network.quantizer.register_forward_hook(
            lambda m, i, o: quantizer_dtypes.add((o[0] if isinstance(o, tuple) else o).dtype)
        )
        before.extend(p.detach().clone() for p in network.parameters())

    trainer, network = _one_training_iteration(brain_dir, VQTrainStep(ssim_weight=1.0, cpu_bf16="force"), hooks)
    out = trainer.state.output
    assert conv_dtypes == {torch.bfloat16}
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert quantizer_dtypes == {torch.float32}
    assert all(p.dtype == torch.float32 for p in network.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, network.parameters(), strict=True))


def test_train_step_fires_monai_iteration_events_with_the_output_filled(brain_dir):
    """The shared ``TrainStep`` iteration, as MONAI's ``SupervisedTrainer`` runs it: each event sees
    ``engine.state.output`` so far; gradients exist after backward, and only the optimizer step changes weights."""
    seen = []

    def attach(trainer):
        first = [p.detach().clone() for p in trainer.network.parameters()]

        def record(event):
            def handler(engine):
                out = engine.state.output
                grads = any(p.grad is not None for p in engine.network.parameters())
                changed = any(not torch.equal(a, b) for a, b in zip(first, engine.network.parameters(), strict=True))
                seen.append((event.name, "pred" in out, "loss" in out, grads, changed))

            return handler

        for event in (
            IterationEvents.FORWARD_COMPLETED,
            IterationEvents.LOSS_COMPLETED,
            IterationEvents.BACKWARD_COMPLETED,
            IterationEvents.MODEL_COMPLETED,
        ):
            trainer.add_event_handler(event, record(event))

    trainer, _ = _one_training_iteration(brain_dir, VQTrainStep(), attach=attach)
    assert seen == [
        ("FORWARD_COMPLETED", True, False, False, False),
        ("LOSS_COMPLETED", True, True, False, False),
        ("BACKWARD_COMPLETED", True, True, True, False),
        ("MODEL_COMPLETED", True, True, True, True),
    ]
    assert all(not v.requires_grad for v in trainer.state.output.values() if isinstance(v, torch.Tensor))


def test_train_step_stops_on_a_nan_loss_before_any_weight_changes(brain_dir):
    """A NaN pixel in a real slice: the step raises with the loss terms named, and no weight was updated."""
    before = []

    def poison(image):
        image = image.clone()
        image[0, 10, 10] = float("nan")
        return image

    with pytest.raises(NonFiniteLossError, match=r"epoch 1, iteration 1: recon_loss nan, quantizer_loss"):
        _one_training_iteration(
            brain_dir,
            VQTrainStep(),
            hooks=lambda net: before.extend((net, [p.detach().clone() for p in net.parameters()])),
            transform=Lambdad("image", poison),
        )
    network, weights = before
    assert all(torch.equal(a, b) for a, b in zip(weights, network.parameters(), strict=True))


def test_clip_must_be_an_increasing_pair():
    with pytest.raises(ValueError, match="clip"):
        VQTrainStep(clip=(1.0, 0.0))


def _shift_output(offset: float):
    """Hook: add ``offset`` to the bias of the decoder's last convolution (every output pixel moves by it)."""

    def hooks(network):
        last = [m for m in network.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last.bias += offset  # sub-pixel convolution: each output pixel reads one bias entry

    return hooks


def test_losses_score_the_clamped_reconstruction(brain_dir):
    """A decoder pushed below zero: the loss is the one of the clamped output (black background costs nothing,
    as in evaluation), the output is in [0, 1], and the gradient still reaches the weights (straight-through)."""
    before = []

    def hooks(network):
        _shift_output(-0.5)(network)
        before.extend(p.detach().clone() for p in network.parameters())

    trainer, network = _one_training_iteration(brain_dir, VQTrainStep(ssim_weight=1.0), hooks=hooks)
    clamped = trainer.state.output
    assert float(clamped["pred"].min()) >= 0.0 and float(clamped["pred"].max()) <= 1.0
    expected = torch.nn.functional.l1_loss(clamped["pred"], clamped["image"])
    assert clamped["recon_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, network.parameters(), strict=True))
    raw, _ = _one_training_iteration(brain_dir, VQTrainStep(ssim_weight=1.0, clip=None), hooks=_shift_output(-0.5))
    # same weights, same batch: the raw output pays for its negative background, the clamped one does not
    assert clamped["recon_loss"].item() < raw.state.output["recon_loss"].item() - 0.05
