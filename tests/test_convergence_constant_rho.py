"""benchmarks/convergence_constant_rho.py: ρ stays constant, ρ = 0 reduces every method to SGD's
trajectory exactly, a positive ρ moves SAM off it, and the stall level and table are computed as
documented."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")  # the digits data set

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "convergence_constant_rho.py"
_spec = importlib.util.spec_from_file_location("sparsam_bench_convergence_constant_rho", _PATH)
ccr = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ccr
_spec.loader.exec_module(ccr)

KW = {"steps": 12, "lr0": 2.0, "every": 3}


@pytest.mark.parametrize("rule", ccr.STEP_RULES)
def test_rho_zero_is_sgd_and_rho_positive_is_not(rule):
    sgd = ccr.run("sgd", 0, rho=0.0, step_rule=rule, **KW)
    assert len(sgd) == 4  # t = 1, 4, 7, 10
    for method in ("sam", "ssam-random"):
        assert ccr.run(method, 0, rho=0.0, step_rule=rule, **KW) == sgd
    assert ccr.run("sam", 0, rho=0.5, step_rule=rule, **KW) != sgd


def test_stall_level_is_the_median_of_the_last_quarter():
    assert ccr.stall_level([9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 1.0, 3.0]) == 2.0
    assert ccr.stall_level([5.0]) == 5.0


def test_table_ratios_to_sam():
    curves = {rule: {m: {"0": [1.0] * 8, "1": [1.0] * 8} for m in ccr.METHODS} for rule in ccr.STEP_RULES}
    curves["constant"]["sgd"] = {"0": [0.5] * 8, "1": [0.25] * 8}
    text = ccr.table({"steps": 80, "rho": 0.5, "seeds": [0, 1], "curves": curves})
    assert "| constant | SGD | 0.375 ± 0.18 | 0.38 (0.25-0.50) |" in text
    assert np.isclose(ccr.stall_level(curves["constant"]["sgd"]["1"]), 0.25)
