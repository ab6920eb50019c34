"""Refuse a misspelled setting on ``python -m monai.bundle run``'s command line.

MONAI's runner adds every ``--name value`` pair to the config (``ConfigParser.update``), whether or not the config
defines ``name``. A typo such as ``--batch_sise 4`` therefore adds an unused key, the run keeps the default batch
size, and the only trace is the INFO echo of the arguments. The runner reads the values with python-fire, which
knows Python's ``True``, ``False`` and ``None`` but passes JSON's ``true``, ``false`` and ``null`` on as text: the
text ``'false'`` counts as true, so ``--resume false`` resumed. The bundles call :func:`check_command_line` in their
``initialize`` section so that such a run stops before it starts, with one line naming the setting and what to
write instead. Python code that embeds a bundle (``monai.bundle.create_workflow``) passes Python values and can call
:func:`unknown_settings` on its own overrides; :func:`command_line_value` writes a value the way the command line
reads it back, for messages that tell users what to pass.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

from vqvae_medical.training.runtime import SettingError

__all__ = [
    "RUNNER_ARGUMENTS",
    "override_names",
    "unknown_settings",
    "json_words",
    "command_line_value",
    "check_command_line",
]

#: arguments that ``monai.bundle run``/``run_workflow`` consume themselves: they are not config settings
RUNNER_ARGUMENTS = frozenset(
    {
        "run_id",
        "init_id",
        "final_id",
        "meta_file",
        "config_file",
        "logging_file",
        "tracking",
        "args_file",
        "workflow_name",
        "workflow_type",
        "properties_path",
    }
)

#: settings that ``--tracking mlflow`` adds to the config and reads from the overrides: the top-level names of MONAI's
#: ``DEFAULT_MLFLOW_SETTINGS["configs"]`` (``tracking_uri``, ``experiment_name``, ``run_name``, ...), read from the
#: installed MONAI so that a setting a later MONAI adds is accepted too
_TRACKING_SETTINGS = frozenset(DEFAULT_MLFLOW_SETTINGS.get("configs", {})) | {"output_dir"}

#: MONAI's id separators: ``#`` and ``::``
_ID_SEP = re.compile(r"#|::")

#: JSON's words that python-fire passes on as text, and what to write on the command line instead
_JSON_WORDS = {"true": "True", "false": "False", "null": "'$None'"}

_MISSING = object()


def override_names(argv: Sequence[str]) -> dict[str, str | None]:
    """The ``--name value`` / ``--name=value`` pairs of a ``python -m monai.bundle`` command line, as python-fire
    reads them: ``{name: value}`` (``None`` for a flag given without a value). Arguments after a bare ``--`` are
    python-fire's own and are skipped."""
    pairs: dict[str, str | None] = {}
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":
            break
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            if eq:
                pairs[name] = value
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                pairs[name] = tokens[i + 1]
                i += 1
            else:
                pairs[name] = None
        i += 1
    return pairs


def _as_list(value: Any) -> list[str]:
    """A ``config_file`` value as fire would pass it: ``"a.json"``, ``"['a.json','b.json']"`` or a list."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "(")):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return [text]
        else:
            return [text]
    return [str(v) for v in value]


def unknown_settings(config: Mapping[str, Any], overrides: Iterable[str], tracking: bool = False) -> list[str]:
    """The override names whose top-level id (before the first ``#``) the merged ``config`` does not define, each
    with a hint to the nearest defined setting: ``"--batch_sise (did you mean --batch_size?)"``.

    Only the top level is checked: ``--network_def#model#norm l1`` may add an argument that the config does not
    spell out, and MONAI itself refuses a path through an undefined section.

    Args:
        config: the merged content of the config files (``ConfigParser.load_config_files``).
        overrides: the override names, e.g. the keyword arguments given to ``monai.bundle.create_workflow``.
        tracking: ``--tracking`` is on, so the experiment-tracking settings are allowed too.
    """
    known = {str(k) for k in config} | {"_meta_"}
    unknown = []
    for name in overrides:
        if name in RUNNER_ARGUMENTS or (tracking and name in _TRACKING_SETTINGS):
            continue
        top = _ID_SEP.split(name, maxsplit=1)[0]
        if top in known:
            continue
        guess = difflib.get_close_matches(top.replace("-", "_"), sorted(known - {"_meta_"}), n=1, cutoff=0.6)
        unknown.append(f"--{name}" + (f" (did you mean --{guess[0]}{name[len(top) :]}?)" if guess else ""))
    return unknown


def _default(config: Mapping[str, Any], name: str) -> Any:
    """The value of the config at the id ``name`` (``#``-separated), or ``_MISSING``."""
    value: Any = config
    for part in _ID_SEP.split(name):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def json_words(config: Mapping[str, Any], pairs: Mapping[str, Any]) -> list[str]:
    """The command-line overrides written with JSON's ``true``, ``false`` or ``null``, which python-fire passes on
    as the text ``'true'``, ``'false'``, ``'null'`` (and the text ``'false'`` counts as true), each with what to
    write instead: ``"--resume false (write --resume False)"``.

    A setting whose config value is plain text (not a ``$`` expression or ``@`` reference) may take such a word
    as its value and is left alone.

    Args:
        config: the merged content of the config files.
        pairs: ``{name: value}`` as :func:`override_names` reads them from the command line.
    """
    found = []
    for name, value in pairs.items():
        if name in RUNNER_ARGUMENTS or not isinstance(value, str) or value not in _JSON_WORDS:
            continue
        default = _default(config, name)
        if isinstance(default, str) and not default.startswith(("$", "@", "%")):
            continue
        found.append(f"--{name} {value} (write --{name} {_JSON_WORDS[value]})")
    return found


def command_line_value(value: Any) -> str:
    """``value`` as a ``python -m monai.bundle run`` argument reads it back: ``True``/``False``, ``'$None'`` for
    None (see :func:`json_words`), lists without spaces (``[32,64]``) so that the shell keeps them in one piece."""
    if value is None:
        return "'$None'"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def check_command_line(argv: Sequence[str] | None = None) -> bool:
    """Stop a ``python -m monai.bundle run`` whose command line names a setting that none of its config files
    defines, or gives a setting JSON's ``true``/``false``/``null`` (:func:`json_words`). Does nothing outside that
    command (e.g. under ``create_workflow`` in Python, or when the config files cannot be read back from the command
    line). Returns ``True`` (for config expressions).

    Raises:
        SettingError: one line listing each unknown setting and the nearest defined one, or each JSON word and
            what to write instead.
    """
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or not argv[0].replace(os.sep, "/").endswith("monai/bundle/__main__.py"):
        return True
    if argv[1] not in ("run", "run_workflow"):
        return True
    pairs = override_names(argv[2:])
    given = dict(pairs)  # the command line's own values, as text (an args_file is JSON or YAML: typed)
    if "args_file" in pairs and pairs["args_file"]:
        try:
            from_file = ConfigParser.load_config_file(pairs["args_file"])
        except Exception:  # MONAI reports an unreadable args_file itself
            return True
        pairs = {**{str(k): v for k, v in dict(from_file).items()}, **pairs}
    files = _as_list(pairs.get("config_file"))
    if not files or not all(os.path.isfile(f) for f in files):
        return True
    config = ConfigParser.load_config_files(files)
    unknown = unknown_settings(config, pairs, tracking=pairs.get("tracking") is not None)
    if unknown:
        names = ", ".join(os.path.relpath(f) for f in files)
        raise SettingError(
            f"{'; '.join(unknown)}: no such setting in {names}. MONAI would add it to the config and the run would "
            "ignore it; correct the name or leave it out."
        )
    words = json_words(config, given)
    if words:
        raise SettingError(
            f"{'; '.join(words)}: the command line reads Python's True, False and None (python-fire); JSON's words "
            "arrive as text, and the text 'false' counts as true."
        )
    return True
