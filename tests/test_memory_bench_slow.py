"""The start-of-run memory estimate against the peak the memory benchmark measures, mode by mode (slow: one
SPIN iteration per mode on the benchmark's 28M-parameter model, each in its own process)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spinlm.config import load_config

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_bench.py"


@pytest.mark.slow
def test_estimate_is_within_30_percent_of_the_measured_peak(tmp_path):
    modes = ["fp32", "bf16", "bf16_ckpt"] + (["lora", "lora_ckpt"] if "peft" in load_config([]).model else [])
    if "lora" in modes:
        pytest.importorskip("peft")
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(BENCH), "--quick", "--modes", ",".join(modes), "--out", str(out)],
                   check=True, timeout=3600)
    ratios = json.loads(out.read_text())["estimate_over_measured"]
    assert sorted(ratios) == sorted(modes)
    for mode, ratio in ratios.items():
        assert 0.7 <= ratio <= 1.3, (mode, ratio)
