"""``cpu_bf16``: bf16 autocast on the CPU only where the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in
``/proc/cpuinfo``); elsewhere fp32 and one warning line, unless ``"force"``d. The CPUs are given as the text of their
``/proc/cpuinfo`` (the flags lines of real machines, shortened), so every case runs on any machine."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from bundle_runner import BUNDLES

from vqvae_medical.stages.autoencoder.steps import VQTrainStep
from vqvae_medical.training import runtime
from vqvae_medical.training.runtime import native_cpu_bf16, resolve_cpu_bf16

_COMMON = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx"
)
#: AMD EPYC (Zen 3, AVX2 only): the CPU of issue #31, where a bf16 3D step took 48x the fp32 time
EPYC_AVX2 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
    f"flags\t\t: {_COMMON} avx2 fma bmi2 sha_ni\n"
)
#: Intel Skylake-SP: AVX-512 but no bf16 instructions (oneDNN emulates bf16 there)
SKYLAKE = f"vendor_id\t: GenuineIntel\nflags\t\t: {_COMMON} avx2 avx512f avx512dq avx512cd avx512bw avx512vl\n"
#: Intel Cooper Lake: AVX512-BF16
COOPER_LAKE = f"vendor_id\t: GenuineIntel\nflags\t\t: {_COMMON} avx2 avx512f avx512bw avx512vl avx512_bf16\n"
#: Intel Sapphire Rapids: AVX512-BF16 and AMX
SAPPHIRE_RAPIDS = f"flags\t\t: {_COMMON} avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"
#: Arm (aarch64) lists ``Features``, not ``flags``: not detected, bf16 only when forced
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16 i8mm\n"


@pytest.mark.parametrize(
    "cpuinfo, native",
    [(EPYC_AVX2, False), (SKYLAKE, False), (COOPER_LAKE, True), (SAPPHIRE_RAPIDS, True), (ARM, False), ("", False)],
)
def test_native_cpu_bf16_reads_the_flags(cpuinfo, native):
    assert native_cpu_bf16(cpuinfo) is native


def test_native_cpu_bf16_without_a_cpuinfo_file(monkeypatch, tmp_path):
    """Not Linux (no ``/proc/cpuinfo``): no native bf16 assumed."""
    monkeypatch.setattr(runtime, "CPUINFO_PATH", tmp_path / "absent")
    assert native_cpu_bf16() is False


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "cpu_bf16" in r.getMessage()]


def test_true_falls_back_to_fp32_without_native_bf16_in_one_warning_line(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_cpu_bf16(True, cpuinfo=EPYC_AVX2) is False
    (message,) = _warnings(caplog)
    assert "\n" not in message and "fp32" in message and "48x" in message and "--cpu_bf16 force" in message


@pytest.mark.parametrize("cpuinfo", [COOPER_LAKE, SAPPHIRE_RAPIDS])
def test_true_uses_bf16_where_native_without_a_word(cpuinfo, caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_cpu_bf16(True, cpuinfo=cpuinfo) is True
    assert not _warnings(caplog)


@pytest.mark.parametrize("value", ["force", "Force"])
def test_force_uses_bf16_on_any_cpu(value, caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_cpu_bf16(value, cpuinfo=EPYC_AVX2) is True
    assert not _warnings(caplog)


def test_false_is_fp32(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_cpu_bf16(False, cpuinfo=SAPPHIRE_RAPIDS) is False
    assert not _warnings(caplog)


@pytest.mark.parametrize("value", ["yes", "true", 1])
def test_other_values_are_refused(value):
    with pytest.raises(ValueError, match="cpu_bf16 must be False, True or 'force'"):
        resolve_cpu_bf16(value, cpuinfo=SAPPHIRE_RAPIDS)


def test_the_training_step_holds_what_it_does(monkeypatch, tmp_path):
    """``TrainStep.cpu_bf16`` is the resolved choice, so the step's autocast follows it."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(EPYC_AVX2)
    monkeypatch.setattr(runtime, "CPUINFO_PATH", cpuinfo)
    assert VQTrainStep(cpu_bf16=True).cpu_bf16 is False
    assert VQTrainStep(cpu_bf16="force").cpu_bf16 is True


def test_vqvae_3d_workflow_trains_in_fp32_on_an_avx2_cpu(monkeypatch, tmp_path, caplog):
    """Where the user meets it: the 3D vqvae training workflow (``configs/3d.json``) with ``cpu_bf16=True`` (the 3D
    commands documented it) on the AMD EPYC of issue #31 builds a training step in fp32 and says so in one warning
    line (it used bf16, 48x slower, after a warning that bf16 'will be slower')."""
    from monai.bundle import create_workflow

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(EPYC_AVX2)
    monkeypatch.setattr(runtime, "CPUINFO_PATH", cpuinfo)
    configs = BUNDLES / "vqvae" / "configs"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="parsing config_file", category=UserWarning)
        workflow = create_workflow(
            config_file=[str(configs / "train.json"), str(configs / "3d.json")],
            meta_file=str(configs / "metadata.json"),
            logging_file=False,
            workflow_type="train",
            bundle_root=str(BUNDLES / "vqvae"),
            output_dir=str(tmp_path / "out"),
            cpu_bf16=True,
        )
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = workflow.parser.get_parsed_content("train#step")
    assert step.cpu_bf16 is False
    assert len(_warnings(caplog)) == 1
    assert not [w for w in caught if "bf16" in str(w.message)]  # no second line from elsewhere


def test_documented_commands_do_not_turn_bf16_on():
    """The README commands a user copies leave ``cpu_bf16`` off (it pays only on CPUs with native bf16)."""
    root = Path(__file__).resolve().parents[2]
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted(BUNDLES.glob("*/docs/README.md"))]
    offending = [
        f"{doc.relative_to(root)}:{number}"
        for doc in docs
        for number, line in enumerate(doc.read_text().splitlines(), start=1)
        if "monai.bundle" in line and "--cpu_bf16 True" in line or line.startswith("TRAIN=") and "cpu_bf16" in line
    ]
    assert not offending, f"commands with --cpu_bf16 True: {offending}"
