"""A misspelled setting on ``python -m monai.bundle run``'s command line stops the run with one line naming it and
the nearest defined setting, instead of being added to the config and ignored (``--batch_sise 4`` used to train at
the default batch size without a word)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundle_runner import BUNDLES, run_bundle
from monai.bundle import ConfigParser
from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

from vqvae_medical.training.command_line import (
    check_command_line,
    command_line_value,
    json_words,
    override_names,
    unknown_settings,
)
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
    config = _config("vqvae", "train.json")
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
    # every setting of the installed MONAI's mlflow defaults, whichever it adds in a later release
    mlflow_settings = sorted(DEFAULT_MLFLOW_SETTINGS["configs"])
    assert "tracking_uri" in mlflow_settings
    assert unknown_settings(config, mlflow_settings, tracking=True) == []


def test_every_bundle_defines_the_common_settings():
    """The settings that the README and every bundle's docs pass to each bundle are defined in its train.json, so
    the check does not refuse them (the default suite runs every bundle through the command line as well)."""
    for name, overlay in (("vqvae", ()), ("vqvae", ("3d.json",)), ("vqvae2", ()), ("pixelcnn_prior", ()),
                          ("latent_diffusion", ())):
        config = _config(name, "train.json", *overlay)
        assert unknown_settings(config, ["bundle_root", "output_dir", "dataset_dir", "max_epochs", "seed"]) == []


def test_check_command_line_only_acts_on_monai_bundle_run(tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLES / "vqvae")
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


def test_json_words_on_the_command_line_are_named_with_their_python_spelling():
    """python-fire passes JSON's true/false/null on as text, and the text 'false' is truthy: ``--resume false``
    resumed, ``--snap_to_codebook false`` snapped. Each such override is named with what to write instead."""
    config = _config("vqvae", "train.json")
    given = override_names(
        [
            "--resume",
            "false",
            "--amp=true",
            "--spatial_size",
            "null",
            "--network_def#model#normalize_latents",
            "false",
            "--max_epochs",
            "3",
            "--resume_typo",
            "False",
            "--device",
            "false",
            "--seed",
            "0",
        ]
    )
    assert json_words(config, given) == [
        "--resume false (write --resume False)",
        "--amp true (write --amp True)",
        "--spatial_size null (write --spatial_size '$None')",
        "--network_def#model#normalize_latents false (write --network_def#model#normalize_latents False)",
    ]  # --device takes text (default "auto"): a word there is its value, left to the setting's own check
    assert json_words(config, override_names(["--resume", "False", "--amp", "True", "--spatial_size", "$None"])) == []
    # the spelling that messages use when they tell users what to pass reads back as the same value
    from fire.parser import DefaultParseValue

    for value in (True, False, 3, 0.5, [32, 64], "tanh"):
        assert DefaultParseValue(command_line_value(value)) == value, value
    assert command_line_value(None) == "'$None'" and command_line_value([32, 64]) == "[32,64]"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"batch_sise": 4}, "ERROR (SettingError): --batch_sise (did you mean --batch_size?)"),
        ({"resume": "false"}, "ERROR (SettingError): --resume false (write --resume False)"),
    ],
)
def test_a_misspelled_setting_stops_the_bundle_with_one_line(tmp_path, override, message):
    """Through ``python -m monai.bundle run`` as a user types it: one ``ERROR (SettingError)`` line, no traceback,
    and nothing trained (the output folder holds no checkpoint)."""
    proc = run_bundle("vqvae", ["train.json"], {"output_dir": tmp_path / "run", **override}, expect_ok=False, threads=1)
    assert proc.returncode != 0, (proc.stdout + proc.stderr)[-3000:]
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith(message), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not list(Path(tmp_path).rglob("*.pt"))
