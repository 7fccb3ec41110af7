"""benchmarks/looksam_stability.py: the g_v it measures along SAM's trajectory is the g_v that
LookSAM (k = 1, which is SAM) stores, step for step; the cosines are those of the stored vectors;
and the command runs end to end on the digits data."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsam.optim.looksam import LookSAM

_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "sparsam_bench_looksam_stability", _ROOT / "benchmarks" / "looksam_stability.py"
)
ls = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ls
_spec.loader.exec_module(ls)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
        for _ in range(n)
    ]


def test_measured_gv_is_what_looksam_stores_and_the_cosines_are_of_those_vectors():
    kw = {"rho": 0.2, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    rows = list(ls.measure(_model(), _batches(5), lags=(1, 3), **kw))
    ref = _model()
    opt = LookSAM(ref.parameters(), torch.optim.SGD, k=1, model=ref, **kw)
    stored = []
    for x, y in _batches(5):

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        stored.append(torch.cat([opt._gv[p].reshape(-1) for p in ref.parameters()]))
    assert [r["step"] for r in rows] == list(range(5))
    for r, gv in zip(rows, stored):
        torch.testing.assert_close(r["gv"], gv, rtol=1e-10, atol=1e-12)
    cos = torch.nn.functional.cosine_similarity
    assert rows[4]["cos gv lag 3"] == pytest.approx(float(cos(stored[4], stored[1], dim=0)), abs=1e-9)
    assert rows[2]["cos gv lag 1"] == pytest.approx(float(cos(stored[2], stored[1], dim=0)), abs=1e-9)
    assert "cos gv lag 3" not in rows[2] and "cos old-gv g lag 1" not in rows[0]
    summary = ls.summarize(rows, [(0, 2), (2, 5), (9, 10)])
    assert [s["steps"] for s in summary] == ["0-1", "2-4"]  # the empty window is dropped
    assert summary[1]["gv/g"] == pytest.approx(sum(r["gv/g"] for r in rows[2:]) / 3)


def test_command_runs_on_digits_and_rejects_bad_lags(tmp_path, capsys):
    out = tmp_path / "rows.json"
    args = [
        "--data",
        "digits",
        "--model",
        "smallcnn",
        "--width",
        "4",
        "--threads",
        "1",
        "--steps",
        "4",
        "--lags",
        "1,2",
    ]
    assert ls.main([*args, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| steps | gv/g | cos gv lag 1 | cos old-gv g lag 1 | cos gv lag 2 | cos old-gv g lag 2 |" in table
    rows = json.loads(out.read_text())
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all(-1 <= r.get("cos gv lag 1", 0) <= 1 for r in rows)
    with pytest.raises(SystemExit):
        ls.main([*args[:-2], "--lags", "0,2"])
    assert "--lags must be integers >= 1, got '0,2'" in capsys.readouterr().err
