"""A misspelled setting on ``python -m monai.bundle run``'s command line stops the run with one line naming it and
the nearest defined setting, instead of being added to the config and ignored (``--batch_sise 4`` used to train at
the default batch size without a word)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundle_runner import BUNDLES, run_bundle
from monai.bundle import ConfigParser

from vqvae_medical.training.command_line import check_command_line, override_names, unknown_settings
from vqvae_medical.training.runtime import SettingError

MONAI_MAIN = "/env/lib/python3.11/site-packages/monai/bundle/__main__.py"


def _config(bundle: str, *files: str) -> dict:
    return ConfigParser.load_config_files([str(BUNDLES / bundle / "configs" / f) for f in files])


def test_override_names_reads_the_command_line_as_python_fire_does():
    argv = ["--config_file", "['a.json','b.json']", "--batch_size=4", "--amp", "--network_def#model#channels", "[8,16]"]
    argv += ["--", "--help"]
    assert override_names(argv) == {
        "config_file": "['a.json','b.json']",
        "batch_size": "4",
        "amp": None,
        "network_def#model#channels": "[8,16]",
    }


def test_unknown_settings_names_the_nearest_defined_setting():
    config = _config("vqvae_2d", "train.json")
    overrides = ["batch_size", "batch_sise", "max-epochs", "network_def#model#channels", "network_def#model#new_arg"]
    overrides += ["config_file", "meta_file", "_meta_#version", "zzzz_unrelated", "netwrok_def#model#channels"]
    assert unknown_settings(config, overrides) == [
        "--batch_sise (did you mean --batch_size?)",
        "--max-epochs (did you mean --max_epochs?)",
        "--zzzz_unrelated",
        "--netwrok_def#model#channels (did you mean --network_def#model#channels?)",
    ]
    # the settings that ``--tracking mlflow`` reads are allowed only with it
    assert unknown_settings(config, ["tracking_uri"]) == ["--tracking_uri"]
    assert unknown_settings(config, ["tracking_uri", "experiment_name"], tracking=True) == []


def test_every_bundle_defines_the_common_settings():
    """The settings that the README and every bundle's docs pass to each bundle are defined in its train.json, so
    the check does not refuse them (the default suite runs every bundle through the command line as well)."""
    for name in ("vqvae_2d", "vqvae_3d", "vqvae2_2d", "pixelcnn_prior", "latent_diffusion"):
        config = _config(name, "train.json")
        assert unknown_settings(config, ["bundle_root", "output_dir", "dataset_dir", "max_epochs", "seed"]) == []


def test_check_command_line_only_acts_on_monai_bundle_run(tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLES / "vqvae_2d")
    typo = ["--config_file", "configs/train.json", "--batch_sise", "4"]
    assert check_command_line(["pytest", "run", *typo])  # not monai.bundle: e.g. create_workflow from Python
    assert check_command_line([MONAI_MAIN, "ckpt_export", *typo])  # other commands do not run the workflow
    assert check_command_line([MONAI_MAIN, "run", "--config_file", "configs/missing.json", "--batch_sise", "4"])
    assert check_command_line([MONAI_MAIN, "run", "--config_file", "configs/train.json", "--batch_size", "4"])
    hint = r"--batch_sise \(did you mean --batch_size\?\): no such setting in configs/train.json"
    with pytest.raises(SettingError, match=hint):
        check_command_line([MONAI_MAIN, "run", *typo])
    # a list of config files, written as on the command line: evaluate.json's settings count too
    both = "['configs/train.json','configs/evaluate.json']"
    assert check_command_line([MONAI_MAIN, "run", "--config_file", both, "--bundle_root", "."])
    # an args_file (MONAI's way to keep the arguments in a file) is read like the command line
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": "configs/train.json", "max_epoch": 3}))
    with pytest.raises(SettingError, match=r"--max_epoch \(did you mean --max_epochs\?\)"):
        check_command_line([MONAI_MAIN, "run", "--args_file", str(args_file)])


def test_a_misspelled_setting_stops_the_bundle_with_one_line(tmp_path):
    """Through ``python -m monai.bundle run`` as a user types it: one ``ERROR (SettingError)`` line, no traceback,
    and nothing trained (the output folder holds no checkpoint)."""
    proc = run_bundle(
        "vqvae_2d", ["train.json"], {"output_dir": tmp_path / "run", "batch_sise": 4}, expect_ok=False, threads=1
    )
    assert proc.returncode != 0, (proc.stdout + proc.stderr)[-3000:]
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith("ERROR (SettingError): --batch_sise (did you mean --batch_size?)"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not list(Path(tmp_path).rglob("*.pt"))
