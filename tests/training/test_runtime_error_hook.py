"""The bundles' error hook: one line for this package's user errors, only on MONAI's bundle command line. A program
that embeds a bundle keeps its own ``sys.excepthook`` and every traceback, also of its own exceptions whose class
happens to be named like ours (``pandas.errors.DataError``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from bundle_runner import BUNDLES, REPO_ROOT, run_bundle

from vqvae_medical.data.checks import DataError
from vqvae_medical.stages.autoencoder.record import RecordMismatchError
from vqvae_medical.stages.frozen import AutoencoderDirError
from vqvae_medical.training.runtime import SettingError, _user_error, install_error_hook, register_user_error
from vqvae_medical.training.steps import NonFiniteLossError
from vqvae_medical.utils.io import CheckpointError, MissingCheckpointError


@pytest.mark.parametrize(
    "error",
    [
        DataError("x.png: unreadable"),
        SettingError("batch_size is not set"),
        NonFiniteLossError("nan"),
        CheckpointError("bad"),
        MissingCheckpointError("absent"),
        RecordMismatchError("other weights"),
        AutoencoderDirError("not trained"),
    ],
)
def test_the_package_user_errors_are_recognised(error):
    assert _user_error(error) is error


def test_other_libraries_errors_with_our_class_names_are_not():
    """Recognised by type, not by name: another library's ``DataError`` keeps its traceback."""

    class DataError(ValueError):  # the name is the point: a host's own class
        pass

    class SettingError(RuntimeError):
        pass

    assert _user_error(DataError("the host's own")) is None
    assert _user_error(SettingError("the host's own")) is None
    pandas_errors = pytest.importorskip("pandas.errors")
    assert _user_error(pandas_errors.DataError("no numeric types to aggregate")) is None


def test_a_stage_can_register_its_own_user_error(monkeypatch):
    from vqvae_medical.utils import errors

    monkeypatch.setattr(errors, "_REGISTERED", list(errors._REGISTERED))

    @register_user_error
    class SamplingError(RuntimeError):
        pass

    assert _user_error(SamplingError("x")) is not None
    with pytest.raises(TypeError, match="exception class"):
        register_user_error("SamplingError")


def test_install_error_hook_leaves_a_host_process_alone():
    """Under pytest (not ``python -m monai.bundle``) the hook is not installed."""
    before = sys.excepthook
    assert install_error_hook() is False
    assert sys.excepthook is before


_HOST = """
import sys, warnings
warnings.simplefilter("ignore")
from monai.bundle import create_workflow
configs = sys.argv[1]
workflow = create_workflow(config_file=configs + "/inference.json", meta_file=configs + "/metadata.json",
                           logging_file=False, workflow_type="infer", bundle_root=sys.argv[2], output_dir=sys.argv[3])
assert sys.excepthook is sys.__excepthook__, "the bundle replaced the host's excepthook"
try:
    from pandas.errors import DataError  # the case of issue #31
except ImportError:
    class DataError(ValueError):  # a host's own class of that name
        pass
raise DataError("the host's own error")
"""


def test_a_host_process_keeps_its_traceback_after_initialize(tmp_path):
    """Issue #31: after ``create_workflow(...)`` (which runs the bundle's ``initialize``) the host's own exception
    named ``DataError`` (``pandas.errors.DataError``) printed one ``ERROR (DataError)`` line and lost its traceback."""
    script = tmp_path / "host.py"
    script.write_text(_HOST)
    bundle = BUNDLES / "vqvae"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VQVAE_MEDICAL_TRACEBACK", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(bundle / "configs"), str(bundle), str(tmp_path / "out")],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "ERROR (" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1].endswith("DataError: the host's own error"), proc.stderr[-3000:]
    assert 'raise DataError("the host\'s own error")' in proc.stderr  # the traceback names the host's line


def test_the_command_line_still_prints_one_line_for_a_package_error(tmp_path):
    """``python -m monai.bundle run`` on an input folder with no images: one ``ERROR (DataError)`` line, no
    traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_bundle(
        "vqvae", ["inference.json"], {"dataset_dir": empty, "output_dir": tmp_path / "out"}, expect_ok=False
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR (DataError): ") and str(empty) in last, proc.stderr[-3000:]
