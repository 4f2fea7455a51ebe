"""The step-time benchmark script runs (smoke mode: tiny backbone, 2 steps) and checks parity."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_time_smoke(tmp_path):
    out = tmp_path / "s.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    for row in ("floor", "lora", "houlsby", "prefix", "prompt"):
        assert re.search(rf"^\| `{re.escape(row)}` ", text, re.M), row
    deltas = [float(x) for x in re.findall(r"max \|Δ logits\| = ([0-9.eE+-]+)", text)]
    assert len(deltas) == 5  # peft's lora, prefix, ptuning_v2, prompt, ptuning with our weights
    assert deltas and all(d <= 1e-5 for d in deltas), deltas


def test_median_ci_is_the_binomial_order_statistic_interval():
    """10 rounds: the 2nd and 9th ratios (coverage 1 - 2 * 11/1024 = 97.9%); 40: the 14th and 27th;
    too few rounds for 95%: none. The interval holds the sample median whatever the order."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from report import median_ci, ratio_ci
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    values = [0.5 + ((7 * i) % 10) / 10 for i in range(10)]  # 0.5 .. 1.4, shuffled
    assert median_ci(values) == (0.6, 1.3)
    assert median_ci([float(i) for i in range(40)][::-1]) == (13.0, 26.0)
    assert median_ci([1.0] * 5) is None and median_ci([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (1.0, 6.0)
    assert ratio_ci([2.0] * 10, [1.0] * 10) == (2.0, 2.0) and ratio_ci([], []) is None
