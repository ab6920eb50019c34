"""``benchmarks/memory_3d.py`` (the 3D bundle's memory target): a small run of the real measurement."""

from __future__ import annotations

import sys

import pytest

from benchmarks.memory_3d import main


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS is read from /proc (Linux only)")
def test_memory_benchmark_reports_both_models_with_a_fixed_mmap_threshold(capsys):
    report = main(["--size", "24", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # --json: exactly one JSON object on stdout
    assert report["input_shape"] == [1, 1, 24, 24, 24]
    assert report["method"] == "rss_increase"
    assert report["malloc_mmap_threshold"] == 128 * 1024  # the same fixed glibc threshold for both workers
    assert report["ours_peak_mb"] > 0 and report["monai_peak_mb"] > 0
    assert report["ratio"] == pytest.approx(report["ours_peak_mb"] / report["monai_peak_mb"], rel=0.02)
