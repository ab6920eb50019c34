"""The bundle configs as the Model Zoo ships them (issue #32): every top-level setting changes the workflow, ``$import``
only what an expression uses, at most 30 ``$`` per ``train.json``, per-rank handlers chosen by type (not by place in
a list), the config-line budgets, and the sections the ``vqvae`` and ``vqvae2`` bundles repeat kept in step.

Each bundle (and the 3D overlay of ``vqvae``) is its own parametrised case. Static checks on the JSON: nothing is
built, so the whole file runs in a second or two.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from bundle_runner import BUNDLES
from monai.bundle import ConfigParser

#: case -> (bundle folder, overlay appended after each command's configs)
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "vqvae": ("vqvae", ()),
    "vqvae_3d": ("vqvae", ("3d.json",)),
    "vqvae2": ("vqvae2", ()),
    "pixelcnn_prior": ("pixelcnn_prior", ()),
    "latent_diffusion": ("latent_diffusion", ()),
    "latent_diffusion_rflow": ("latent_diffusion", ("rflow.json",)),
}
#: what each command runs: the configs before the overlay, and the ids its run starts from
COMMANDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "train": (("train.json",), ("initialize", "run", "finalize")),
    "evaluate": (("train.json", "evaluate.json"), ("initialize", "run", "finalize")),
    "inference": (("inference.json",), ("initialize", "run", "finalize")),
}
#: settings that change nothing a run builds, on purpose
ALLOWED_UNUSED = {
    # MONAI's command line sets it (``--bundle_root``); the configs derive output_dir from it
    "bundle_root": "MONAI's own setting",
    # the list of ``$import`` lines: checked by test_imports_are_used
    "imports": "imports",
    # pixelcnn_prior: the class names of evaluate.json's figures, in train.json so that train and train+evaluate take
    # the same settings (a --class_names given to train is not refused as undefined by check_command_line)
    "class_names": "read by evaluate.json",
}
#: MONAI's required inference properties (InferProperties), ``None`` where an inference generates instead of reading
#: images (pixelcnn_prior, latent_diffusion); used by the autoencoders' inference
GENERATIVE_INFERENCE = {"dataset_dir": "required", "dataset": "required", "evaluator": "required"}
#: top-level entries that are the workflow, not settings
ENTRY_POINTS = ("initialize", "run", "finalize")
#: ids a ``multi_gpu_train.json`` may reference with a list index (a place in a list): none
POSITIONAL_REF = re.compile(r"@[\w#]*#\d+\b")
REF = re.compile(r"@([A-Za-z_][\w]*(?:#[\w]+)*)")
MAX_DOLLARS_PER_TRAIN = 30
#: (bundles, budget in lines of JSON under their configs/, lines measured when the budget was not yet met or None)
LINE_BUDGETS = {
    "autoencoders": (("vqvae", "vqvae2"), 850, 1000),
    "stage2": (("pixelcnn_prior", "latent_diffusion"), 950, 1240),
    "wing": (("vqvae", "vqvae2", "pixelcnn_prior", "latent_diffusion"), 1800, 2240),
}


def _configs(bundle: str) -> Path:
    return BUNDLES / bundle / "configs"


def _load(bundle: str, files: Sequence[str]) -> dict[str, Any]:
    """The merged content of ``files`` as ``monai.bundle`` merges them (later files override earlier ids)."""
    return ConfigParser.load_config_files([str(_configs(bundle) / f) for f in files])


def _raw(bundle: str, name: str) -> dict[str, Any]:
    """One config file as written (its ids unmerged)."""
    return json.loads((_configs(bundle) / name).read_text())


def _get(config: Any, ref: str) -> Any:
    value = config
    for part in ref.split("#"):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def _resolved(config: dict[str, Any], roots: Sequence[str]) -> str:
    """The entries ``roots`` of ``config`` with every ``@id`` replaced by what it refers to, recursively (in
    expressions too): what the workflow builds, as text. A setting no root reaches leaves it unchanged."""
    memo: dict[str, str] = {}

    def expand(value: Any, stack: tuple[str, ...]) -> str:
        if isinstance(value, dict):
            return "{" + ",".join(f"{k}:{expand(v, stack)}" for k, v in value.items()) + "}"
        if isinstance(value, list):
            return "[" + ",".join(expand(v, stack) for v in value) + "]"
        if isinstance(value, str) and ("@" in value):
            return REF.sub(lambda m: "(" + ref(m.group(1), stack) + ")", value)
        return json.dumps(value)

    def ref(name: str, stack: tuple[str, ...]) -> str:
        if name in stack:
            raise AssertionError(f"reference cycle through @{name}")
        if name not in memo:
            try:
                target = _get(config, name)
            except (KeyError, IndexError, ValueError, TypeError):
                return f"<missing {name}>"
            memo[name] = expand(target, (*stack, name))
        return memo[name]

    return "|".join(expand(config[r], (r,)) for r in roots if r in config)


def _other_value(value: Any) -> Any:
    """A different value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, list):
        return [*value, value[0] if value else 1]
    if isinstance(value, dict):
        return {} if value else {"_other_": 1}
    return "other"  # None


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_setting_changes_the_workflow(case, command):
    """Overriding a top-level setting (with another value of its type) changes what the command's workflow builds:
    no setting is handed to nothing, or to a component nobody uses. Checked for the settings of the command's last
    file (``evaluate.json``'s for evaluate) in the merged configs, overlay included; the overlay's own settings are
    checked by test_overlay_settings_are_used_by_some_command."""
    bundle, overlay = CASES[case]
    files, roots = COMMANDS[command]
    if not all((_configs(bundle) / f).is_file() for f in files):
        pytest.skip(f"{bundle} has no {files[-1]}")
    config = _load(bundle, [*files, *overlay])
    base = _resolved(config, roots)
    unused = []
    allowed = ALLOWED_UNUSED.keys() | (GENERATIVE_INFERENCE.keys() if command == "inference" else set())
    for key in _raw(bundle, files[-1]):
        if "#" in key or key in ENTRY_POINTS or key in allowed:
            continue
        if _resolved({**config, key: _other_value(config[key])}, roots) == base:
            unused.append(key)
    assert not unused, f"{case} {command}: these settings change nothing the workflow builds: {unused}"


def _reaches(config: dict[str, Any], key: str, roots: Sequence[str]) -> bool:
    return _resolved({**config, key: _other_value(config[key])}, roots) != _resolved(config, roots)


@pytest.mark.parametrize("case", sorted(CASES))
def test_overlay_settings_are_used_by_some_command(case):
    """Each setting of an overlay changes the workflow of at least one command it is documented with."""
    bundle, overlay = CASES[case]
    if not overlay:
        pytest.skip("no overlay")
    unused = {k for name in overlay for k in _raw(bundle, name)}
    for files, roots in COMMANDS.values():
        config = _load(bundle, [*files, *overlay])
        unused -= {k for k in list(unused) if "#" in k or _reaches(config, k, roots)}
    assert not unused, f"{overlay} settings that no command uses: {sorted(unused)}"


def _expressions(bundle: str) -> list[str]:
    """Every ``$`` expression of every config of a bundle but the ``$import`` lines."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            [walk(v) for v in value.values()]
        elif isinstance(value, list):
            [walk(v) for v in value]
        elif isinstance(value, str) and value.startswith("$") and not re.match(r"\$\s*(import|from)\s", value):
            found.append(value)

    for path in sorted(_configs(bundle).glob("*.json")):
        walk(json.loads(path.read_text()))
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_imports_are_used(case):
    """``$import x`` only for a module an expression names (MONAI imports a ``_target_``'s module itself; ``torch``
    and ``monai`` are always there)."""
    bundle, _ = CASES[case]
    used = "\n".join(_expressions(bundle))
    unused = []
    for path in sorted(_configs(bundle).glob("*.json")):
        for line in json.loads(path.read_text()).get("imports", []):
            match = re.match(r"\$\s*import\s+([\w.]+)(?:\s+as\s+(\w+))?$", line) or re.match(
                r"\$\s*from\s+[\w.]+\s+import\s+(\w+)(?:\s+as\s+(\w+))?$", line
            )
            assert match, f"{path.name}: unexpected import line {line!r}"
            name = match.group(2) or match.group(1)
            if not re.search(rf"(?<![\w.]){re.escape(name)}\.", used):
                unused.append(f"{path.name}: {line}")
    assert not unused, f"{bundle}: imports no expression uses: {unused}"


def _dollars(bundle: str, name: str) -> int:
    return len(re.findall(r'"\$', (_configs(bundle) / name).read_text()))


@pytest.mark.parametrize("case", sorted(c for c in CASES if not CASES[c][1]))
def test_train_json_has_at_most_30_expressions(case):
    bundle, _ = CASES[case]
    count = _dollars(bundle, "train.json")
    assert count <= MAX_DOLLARS_PER_TRAIN, f"{bundle}/configs/train.json has {count} '$' expressions"


@pytest.mark.parametrize("case", sorted(c for c in CASES if not CASES[c][1]))
def test_multi_gpu_chooses_handlers_by_type_not_position(case):
    """``multi_gpu_train.json`` names no handler by its index in a list (``@train#handlers#8`` breaks silently when
    the list changes); ``tests/bundles/test_multi_gpu.py`` checks which handlers each rank runs."""
    bundle, _ = CASES[case]
    text = (_configs(bundle) / "multi_gpu_train.json").read_text()
    assert not POSITIONAL_REF.findall(text), f"{bundle}: positional references {POSITIONAL_REF.findall(text)}"


def _lines(bundles: Sequence[str]) -> int:
    return sum(len(p.read_text().splitlines()) for b in bundles for p in _configs(b).glob("*.json"))


@pytest.mark.parametrize("budget", sorted(LINE_BUDGETS))
def test_config_line_budget(budget, request):
    bundles, limit, measured = LINE_BUDGETS[budget]
    if measured is not None:
        request.applymarker(
            pytest.mark.xfail(strict=True, reason=f"{budget}: {measured} lines measured, budget {limit}")
        )
    lines = _lines(bundles)
    assert lines <= limit, f"{budget} ({', '.join(bundles)}): {lines} lines of config JSON, budget {limit}"


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a#b#0": leaf}`` of a config."""
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}#").items()}
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        return {k: v for i, sub in enumerate(value) for k, v in _flat(sub, f"{prefix}{i}#").items()}
    return {prefix[:-1]: value}


#: the VQ-VAE-2 network's settings that differ from the VQ-VAE's, in every config that builds the network
VQVAE2_NETWORK = {
    "num_embeddings",
    "embedding_dim",
    "network_def#model#_target_",
    "network_def#model#channels",
    "network_def#model#res_channels",
    "network_def#model#normalize_latents",
}
#: what the VQ-VAE-2 recipe sets apart from the VQ-VAE's (all else of the two bundles' configs is the same)
VQVAE2_DIFFERS = {
    "train.json": VQVAE2_NETWORK
    | {"batch_size", "learning_rate", "range_weight", "time_budget_minutes", "train#handlers#9#keys"},
    "inference.json": VQVAE2_NETWORK,
    "evaluate.json": set(),
    "multi_gpu_train.json": set(),
}


@pytest.mark.parametrize("name", sorted(VQVAE2_DIFFERS))
def test_vqvae_and_vqvae2_configs_do_not_drift(name):
    """The ``vqvae`` and ``vqvae2`` bundles repeat their workflow (handlers, datasets, metrics, the per-rank
    selection): a change to one copy that the other does not follow fails here. Only the recipe differs."""
    a = _flat(json.loads((_configs("vqvae") / name).read_text()))
    b = _flat(json.loads((_configs("vqvae2") / name).read_text()))
    differ = {k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>")}
    assert differ == VQVAE2_DIFFERS[name], f"{name}: drifted {sorted(differ - VQVAE2_DIFFERS[name])}, " + (
        f"now the same {sorted(VQVAE2_DIFFERS[name] - differ)}"
    )


def test_the_probe_sees_a_setting_handed_to_nothing():
    """The check of test_every_setting_changes_the_workflow fails on a setting no root reaches, and on one handed
    only to an unused component; a used one passes."""
    config = {"a": 1, "b": 2, "c": "@b", "used": 3, "run": ["$print(@used)"]}
    base = _resolved(config, ("run",))
    for key, reaches in (("a", False), ("b", False), ("c", False), ("used", True)):
        assert (_resolved({**config, key: _other_value(config[key])}, ("run",)) != base) is reaches, key
