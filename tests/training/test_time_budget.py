"""Default training runs end on ``max_epochs``, not on the clock: the same seed gives the same model on a fast or a
slowed machine; the wall-clock ceiling only guards, and says in one WARNING line when it cuts a run; the explicit
time budget (the docs' CPU-minute experiments) still ends runs on time and decays the learning rate by it."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch
from bundle_runner import BUNDLES, TINY_VQVAE_2D, monai_bundle
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler
from tiny import cpu_trainer

from vqvae_medical.training.handlers import TimeBudget
from vqvae_medical.training.schedules import cosine_decay

#: every bundle whose training runs a learning-rate schedule, and every training bundle with its handler
SCHEDULED = ["vqvae", "vqvae2", "vqvae_3d"]
TRAINING = [*SCHEDULED, "pixelcnn_prior", "latent_diffusion"]


def _train_config(bundle: str) -> ConfigParser:
    folder, overlay = ("vqvae", ["3d.json"]) if bundle == "vqvae_3d" else (bundle, [])  # the 3D overlay
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / folder / "configs" / c) for c in ("train.json", *overlay)])
    return parser


def _time_budget_id(parser: ConfigParser) -> str:
    """Config id of the bundle's ``TimeBudget`` handler."""
    if "time_budget" in parser["train"]:
        return "train#time_budget"
    handlers = parser["train"]["handlers"]
    index = next(i for i, h in enumerate(handlers) if isinstance(h, dict) and h["_target_"].endswith(".TimeBudget"))
    return f"train#handlers#{index}"


@pytest.mark.parametrize("bundle", TRAINING)
def test_defaults_end_on_epochs_with_only_a_wall_ceiling(bundle):
    """No bundle's default trains for a time budget; its TimeBudget reads the ceiling setting, and a ceiling, where
    one is set, is at least 30 wall-minutes."""
    parser = _train_config(bundle)
    budget_id = _time_budget_id(parser)
    assert parser[budget_id]["ceiling_minutes"] == "@wall_ceiling_minutes"
    budget = parser.get_parsed_content(budget_id)
    assert not budget.minutes, f"{bundle}: a default time budget makes the model depend on the machine"
    assert budget.mode in (None, "ceiling") and budget.fraction_spent == 0.0
    assert not budget.ceiling_minutes or budget.ceiling_minutes >= 30


@pytest.mark.parametrize("bundle", SCHEDULED)
def test_default_learning_rate_follows_epochs_however_long_they_take(bundle):
    """The bundle's own scheduler, its ceiling reporting ten hours spent: the rate is the epoch-based cosine."""
    parser = _train_config(bundle)
    scheduler = parser.get_parsed_content("lr_scheduler")
    guard = parser.get_parsed_content("train#time_budget")
    guard.spent_s = 10 * 3600.0
    max_epochs, final = parser["max_epochs"], parser["final_lr_factor"]
    for epoch in (0, 1, max_epochs // 2):
        assert scheduler.lr_lambdas[0](epoch) == pytest.approx(cosine_decay(max_epochs, None, final)(epoch))
    assert scheduler.lr_lambdas[0](1) > 0.9


def test_explicit_budget_still_decays_by_the_time_spent():
    """``--time_budget_minutes N`` (budget mode) ends at the low rate when the budget ends first; the ceiling is
    ignored then, and the budget's clock is the process CPU time by default."""
    budget = TimeBudget(minutes=2.0, ceiling_minutes=1.0)
    assert budget.mode == "budget" and budget.clock == "process" and budget.limit_s == 120.0
    budget.spent_s = 120.0
    assert cosine_decay(1000, budget, 0.01)(1) == pytest.approx(0.01)
    ceiling = TimeBudget(minutes=0, ceiling_minutes=2.0)
    ceiling.spent_s = 120.0
    assert ceiling.spent and ceiling.fraction_spent == 0.0
    assert cosine_decay(1000, ceiling, 0.01)(1) == pytest.approx(cosine_decay(1000, None, 0.01)(1))


@pytest.mark.parametrize("ceiling", ["null", -1.0])
def test_ceiling_rejects_what_is_not_a_number_of_minutes(ceiling):
    with pytest.raises(ValueError, match="wall_ceiling_minutes must be"):
        TimeBudget(ceiling_minutes=ceiling)


def _train_tiny(
    guard: TimeBudget, pause_s: float, max_epochs: int = 3
) -> tuple[dict[str, torch.Tensor], SupervisedTrainer]:
    """A real MONAI trainer on a tiny regression with the bundles' cosine schedule read from ``guard``; ``pause_s``
    of sleep after the first iteration stand for a machine that was busy for a while."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    data = [{"image": torch.randn(2, 4), "label": torch.randn(2, 1)} for _ in range(4)]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_decay(max_epochs, guard, 0.01))
    handlers = [LrScheduleHandler(scheduler, print_lr=False), guard]
    trainer = cpu_trainer(net, data, optimizer, torch.nn.MSELoss(), max_epochs, train_handlers=handlers)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda _: time.sleep(pause_s))
    trainer.run()
    return {k: v.clone() for k, v in net.state_dict().items()}, trainer


def test_a_slowed_run_reaches_the_same_weights_under_the_ceiling():
    """With a ceiling (not reached), a run slowed by 1.5 s ends on the same epoch with bit-identical weights; the
    same slowdown under a time budget of the same length changes the weights (so the comparison can tell)."""
    fast, fast_trainer = _train_tiny(TimeBudget(ceiling_minutes=0.05), pause_s=0.0)
    slow, slow_trainer = _train_tiny(TimeBudget(ceiling_minutes=0.05), pause_s=1.5)
    assert fast_trainer.state.epoch == slow_trainer.state.epoch == 3
    assert all(torch.equal(fast[k], slow[k]) for k in fast)
    budget_slow, budget_trainer = _train_tiny(TimeBudget(minutes=0.05, clock="wall"), pause_s=1.5)
    assert budget_trainer.state.epoch == 3, "the budget was not meant to end this run"
    assert not all(torch.equal(fast[k], budget_slow[k]) for k in fast)


def test_the_ceiling_cuts_with_one_warning(caplog):
    """A ceiling shorter than the run: training stops after the epoch in progress, with one WARNING line that says
    which epoch of how many and how to train them all."""
    with caplog.at_level(logging.INFO, logger="vqvae_medical.training.handlers"):
        _, trainer = _train_tiny(TimeBudget(ceiling_minutes=0.01), pause_s=1.0, max_epochs=5)
    assert trainer.state.epoch == 1 and trainer.state.iteration < 4, "the epoch in progress was not cut short"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    message = warnings[0].getMessage()
    assert "\n" not in message
    assert "cut training at epoch 1 of 5" in message and "the model is not the documented one" in message
    assert "--wall_ceiling_minutes 0" in message


#: a later config file that sleeps 0.3 s after every training iteration (a busy machine, as far as the clock sees);
#: no word "import" in it: MONAI would take the expression for an import statement
SLOW_OVERLAY = {
    "+imports": ["$import ignite"],  # appended to train.json's imports, which need not name ignite
    "train#trainer#train_handlers": "$@train#handlers + [type('Slow', (), {'attach': lambda self, engine: "
    "engine.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, "
    "lambda e: ignite.engine.engine.time.sleep(0.3))})()]"
}


def test_default_bundle_run_gives_the_same_checkpoints_when_slowed(tmp_path, brain_files, real_folder):
    """``vqvae`` at its default stopping and schedule, once as is and once slowed by a sleep in every iteration:
    both train every epoch and write bit-identical checkpoints and best models (same seed)."""
    data = real_folder(brain_files(10), tmp_path / "data")
    overlay = tmp_path / "slow.json"
    overlay.write_text(json.dumps(SLOW_OVERLAY))
    settings = {**TINY_VQVAE_2D, "max_epochs": 2, "dataset_dir": data, "data_layout": "folder"}
    settings.update(val_fraction=0.2, test_fraction=0.2)
    outs = {}
    for name, configs in (("fast", ["configs/train.json"]), ("slow", ["configs/train.json", str(overlay)])):
        outs[name] = tmp_path / name
        config_arg = json.dumps(configs).replace('"', "'")
        overrides = {"bundle_root": ".", **settings, "output_dir": outs[name]}
        proc = monai_bundle("vqvae", "run", ["--config_file", config_arg], overrides)
        assert "ceiling" not in proc.stdout + proc.stderr
        history = [json.loads(line) for line in (outs[name] / "logs" / "history.jsonl").read_text().splitlines()]
        assert max(r["epoch"] for r in history) == 2
        if name == "slow":  # 3 training iterations per epoch, 0.3 s of sleep after each
            ends = [r["time"] for r in history if r["phase"] == "train"]
            assert ends[1] - ends[0] >= 0.9, "the overlay did not slow the run"
    for name in ("models/model.pt", "models/checkpoint_epoch=2.pt"):
        fast = torch.load(outs["fast"] / name, weights_only=True)
        slow = torch.load(outs["slow"] / name, weights_only=True)
        fast_model, slow_model = fast.get("model", fast), slow.get("model", slow)
        assert fast_model.keys() == slow_model.keys()
        assert all(torch.equal(fast_model[k], slow_model[k]) for k in fast_model), name
