"""Every benchmark still runs: each `bench/*.py` with `--smoke` (its smallest settings), each shell script in its
smallest mode, found by glob so that a new benchmark is covered the day it is added. And the GPU check's report."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
# Run by test_gpu_check_dry_run_reports_every_check_in_one_table (the script drives the Python helper).
SEPARATE = {"gpu_check.py", "gpu_check.sh"}
# A shell script's smallest mode: (arguments, environment).
SCRIPTS = {"teardown_check.sh": ([], {"N": "1"})}
TIMEOUT = 300  # seconds; each takes seconds alone, more on a machine shared with other jobs


def _names(pattern):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(BENCH, pattern)))


def _run(command, env=None):
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                          env=dict(os.environ, **(env or {})))
    assert done.returncode == 0, (f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                                  f"{done.stderr[-3000:]}")
    return done.stdout


@pytest.mark.parametrize("name", [n for n in _names("*.py") if n not in SEPARATE])
def test_bench_script_runs_with_smoke(name):
    output = _run([sys.executable, os.path.join("bench", name), "--smoke"])
    assert output.strip(), f"{name} --smoke printed nothing"


@pytest.mark.parametrize("name", [n for n in _names("*.sh") if n not in SEPARATE])
def test_shell_script_runs_in_its_smallest_mode(name):
    assert name in SCRIPTS, f"bench/{name}: add its smallest mode to SCRIPTS in tests/test_bench.py"
    arguments, env = SCRIPTS[name]
    _run(["bash", os.path.join("bench", name)] + arguments, dict(env, PYTHON=sys.executable))


def test_gpu_check_dry_run_reports_every_check_in_one_table():
    output = _run(["bash", "bench/gpu_check.sh", "--dry_run"], {"PYTHON": sys.executable})
    table = [line for line in output.splitlines() if line.startswith("| (")]
    checks = {line.split(" | ")[0] for line in table}
    assert checks == {"| (1) fused attention vs plain", "| (2) AMP O2 vs fp32 training", "| (2) MFU, fine-tuning step",
                      "| (3) Paddle Inference, glm-large float32", "| (4) ONNX Runtime, glm-large weight_only_int8",
                      "| (3) Paddle Inference, glm-10b-shaped (2 of 48 layers) float32",
                      "| (4) ONNX Runtime, glm-10b-shaped (2 of 48 layers) weight_only_int8"}
    assert len(table) == 3 + 4 * 2  # the serving rows at batch 1 and 16
    assert "ERROR" not in output and "goals met, 0 check(s) failed" in output


def test_gpu_check_report_shows_failed_checks_and_counts_goals(tmp_path):
    rows = tmp_path / "rows.jsonl"
    lines = [dict(check="(1) a", setting="s", measured="m", goal="g", ok=True),
             dict(check="(2) b", setting="s", measured="m", goal="report", ok=None),
             dict(check="(3) c", setting="s", measured="m", goal="g", ok=False),
             dict(check="mfu", error="timed out after 90 s, log: x")]
    rows.write_text("\n".join(json.dumps(line) for line in lines) + '\n{"check": "amp", "meas', encoding="utf-8")
    output = _run([sys.executable, "bench/gpu_check.py", "--report", str(rows)])
    assert "| (1) a | s | m | g | ok |" in output and "| (3) c | s | m | g | MISSED |" in output
    assert "| (2) b | s | m | report | - |" in output
    assert "| mfu | - | timed out after 90 s, log: x | - | ERROR |" in output
    assert "1 of 2 goals met, 1 check(s) failed, 1 unreadable line(s)" in output
