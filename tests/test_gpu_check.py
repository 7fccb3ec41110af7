"""benchmarks/gpu_check.sh --dry-run: every step of the one-GPU check set up and run once on tiny
sizes on the CPU, so the script that runs when a GPU is lent does not fail on its setup."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "step_cost_bf16", "step_cost_fp16", "step_cost_fp32", "implicit_bf16", "implicit_fp16", "fisher_cost")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_dry_run_writes_every_table(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for step in STEPS:
        assert f"| {step} | ok |" in summary, summary[:2000]
        assert (out / f"{step}.md").stat().st_size > 0
    # one row per variant, in both precisions; the fp16 run went through a GradScaler
    for precision in ("bf16", "fp16"):
        table = (out / f"step_cost_{precision}.md").read_text()
        for variant in ("| SGD |", "| SAM |", "| ASAM |", "| SSAM N:M 2:4 +cheap |", "| SSAM implicit 2:4 |"):
            assert variant in table, (precision, variant)
        implicit = (out / f"implicit_{precision}.md").read_text()
        assert "| SSAM implicit 2:4 (sparse dX) |" in implicit and "| SSAM implicit 2:4 (dense dX) |" in implicit
    assert "GradScaler scales after the run" in (out / "step_cost_fp16.md").read_text()
    assert "batch-1 loop" in (out / "fisher_cost.md").read_text()


def test_refuses_without_a_gpu_unless_dry_run(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real run would start")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "gpu")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
