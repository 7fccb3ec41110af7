"""benchmarks/fsdp_memory.py's table: the byte ratio per rank, and the optimizer-time ratio as the
median over rounds of the per-round ratio FSDP2 / DDP (not the ratio of medians), checked on
made-up per-rank results (the 2-process run itself is a benchmark, not a test)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "fsdp_memory.py"
_spec = importlib.util.spec_from_file_location("sparsam_bench_fsdp_memory", _PATH)
fm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fm
_spec.loader.exec_module(fm)

MIB = 2**20


def _rank(ddp_times: list[float], fsdp_times: list[float]) -> dict:
    full, half = 8 * MIB, 4 * MIB
    return {
        "bytes": {
            "ddp": {"backup": full, "params": full, "momentum": full},
            "fsdp2": {"backup": half, "params": half, "momentum": half},
        },
        "times": {"ddp": ddp_times, "fsdp2": fsdp_times},
    }


def _cells(line: str) -> list[str]:
    return line.strip("| ").split(" | ")


def test_time_ratio_is_the_median_of_per_round_ratios():
    # Per-round ratios 0.5, 0.8, 2.0 -> median 0.8; the ratio of medians would be 0.004/0.004 = 1.0.
    ddp, fsdp = [0.004, 0.002, 0.005], [0.002, 0.004, 0.004]
    ratios = [b / a for a, b in zip(ddp, fsdp)]
    text = fm.table([_rank(ddp, fsdp), _rank(ddp[::-1], fsdp[::-1])], width=8, rounds=3)
    rows = [_cells(line) for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"]
    for row in rows:
        assert row[1:6] == ["8.00", "4.00", "0.500", "4.00", "4.00"]
        assert row[6:8] == [f"{1e3 * statistics.median(ddp):.2f}", f"{1e3 * statistics.median(fsdp):.2f}"]
        assert row[8] == f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
    assert rows[0][8].startswith("0.80 ")


def test_bytes_only_without_rounds():
    text = fm.table([_rank([], []), _rank([], [])], width=8, rounds=0)
    header = next(line for line in text.splitlines() if line.startswith("| rank"))
    assert "time" not in header and len(_cells(header)) == 6
    assert "optimizer time" not in text
