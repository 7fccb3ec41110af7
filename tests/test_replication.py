"""benchmarks/replication.py: the replication's paired statistics against scipy and hand-computed
Holm and TOST values, and its tables and figures on a synthetic study root."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

scipy_stats = pytest.importorskip("scipy.stats")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "replication.py"
_spec = importlib.util.spec_from_file_location("sparsam_bench_replication", _PATH)
rp = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = rp
_spec.loader.exec_module(rp)


def test_paired_stats_equal_scipy():
    d = [0.4, 1.9, -0.3, 1.1, 0.8, 1.5]
    c = rp.paired_stats(rp.Contrast("C", "a", "b", "q", d, list(range(6))))
    ref = scipy_stats.ttest_1samp(d, 0.0)
    assert c.p == pytest.approx(ref.pvalue, rel=1e-12)
    lo, hi = scipy_stats.t.interval(0.95, 5, loc=scipy_stats.tmean(d), scale=scipy_stats.sem(d))
    assert (c.lo, c.hi) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    # TOST: the larger of the two one-sided p-values against -1 and +1
    up = scipy_stats.ttest_1samp(d, -1.0, alternative="greater").pvalue
    down = scipy_stats.ttest_1samp(d, 1.0, alternative="less").pvalue
    assert c.p_tost == pytest.approx(max(up, down), rel=1e-12)


def test_holm_by_hand():
    assert rp.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert rp.holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]
    assert rp.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # min(1, 2 * 0.8) then the running max


def _write(root: Path, name: str, seed: int, acc: float, compute: float) -> None:
    run = root / "runs" / f"{name}-seed{seed}"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"finished": True, "final_test_acc": acc / 100}))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 20, "compute": compute}) + "\n")


def test_tables_verdicts_and_figures(tmp_path):
    compute = {"sgd": 780, "sgd-1.25x": 975, "sgd-2x": 1560, "sam": 1560, "ssam-f": 1580, "ssam-f-masked": 1500}
    compute |= {"sam-asc": 975, "ssam-f-asc": 995}
    offset = {"sgd": 0.0, "sgd-1.25x": 0.5, "sgd-2x": 1.0, "sam": 3.0, "ssam-f": 3.1, "ssam-f-masked": 3.0}
    offset |= {"sam-asc": 1.4, "ssam-f-asc": 1.0}
    wobble = [0.0, 0.3, -0.2, 0.1, -0.1, 0.2]
    for i, seed in enumerate(range(3, 9)):
        for cfg in rp.CONFIGS:
            # ssam-f-asc gets its own large noise so C5 stays unresolved; ssam-f tracks sam within ±0.2 (level)
            extra = [2.5, -2.0, 1.5, -2.5, 2.0, -1.0][i] if cfg == "ssam-f-asc" else 0.0
            extra += [0.2, -0.1, 0.0, 0.1, -0.2, 0.0][i] if cfg in ("ssam-f", "ssam-f-masked") else 0.0
            _write(tmp_path, cfg, seed, 50 + offset[cfg] + wobble[i] * (cfg != "sgd") + extra, compute[cfg])
    runs = rp.load_runs(tmp_path)
    by = {c.name: c for c in rp.contrasts(runs)}
    assert by["C1"].verdict == "above" and by["C6"].verdict == "above"  # +2 and +3 with little noise
    assert by["C2"].verdict.startswith("level") and by["C3"].verdict.startswith("level")  # +0.1 and 0
    assert by["C5"].verdict == "not resolved"
    assert by["C2"].mean == pytest.approx(0.1) and len(by["C2"].diffs) == 6
    text = rp.tables(runs)
    assert "| SAM | 3,4,5,6,7,8 |" in text and "| 2.00 |" in text  # SAM's compute is 2x SGD's
    assert "C4 | SAM, quarter-batch ascent − SGD, 1.25x epochs | 6 | +0.90" in text
    pytest.importorskip("matplotlib")
    paths = rp.figures(runs, tmp_path / "fig")
    assert [p.name for p in paths] == ["replication_contrasts.png", "replication_accuracy.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_unfinished_runs_are_left_out_and_counted(tmp_path):
    _write(tmp_path, "sam", 3, 60.0, 1560)
    _write(tmp_path, "sgd", 3, 58.0, 780)
    _write(tmp_path, "sam", 4, 61.0, 1560)
    run = tmp_path / "runs" / "sgd-seed4"
    run.mkdir()
    (run / "config.json").write_text("{}")  # started, not finished
    c6 = {c.name: c for c in rp.contrasts(rp.load_runs(tmp_path))}["C6"]
    assert c6.diffs == [pytest.approx(2.0)] and c6.mean is None and c6.verdict == "not resolved"


def test_msam_study_has_its_own_contrasts_holm_family_and_figures(tmp_path):
    # MSAM +2 over SGD with little noise (M1 above), sparse MSAM noisy around SGD (M2 unresolved),
    # MSAM 1 point under SAM with little noise (M3 below); the replication's runs beside them
    # (here sgd-2x) are not part of this study
    wobble = [0.0, 0.3, -0.2, 0.1, -0.1, 0.2]
    noise = [2.5, -2.0, 1.5, -2.5, 2.0, -1.0]
    for i, seed in enumerate(range(3, 9)):
        _write(tmp_path, "sgd", seed, 50.0, 780)
        _write(tmp_path, "sgd-2x", seed, 51.0 + wobble[i], 1560)
        _write(tmp_path, "sam", seed, 53.0 + wobble[i], 1560)
        _write(tmp_path, "msam", seed, 52.0 + 0.5 * wobble[i], 780)
        _write(tmp_path, "smsam-f", seed, 50.0 + noise[i], 786)
    runs = rp.load_runs(tmp_path)
    study = rp.STUDIES["msam"]
    by = {c.name: c for c in rp.contrasts(runs, study)}
    assert sorted(by) == ["M1", "M2", "M3"]
    assert by["M1"].verdict == "above" and by["M3"].verdict == "below" and by["M2"].verdict == "not resolved"
    assert by["M1"].mean == pytest.approx(2.0 + 0.5 * sum(wobble) / 6)
    # Holm over three contrasts: the smallest p is multiplied by 3
    assert min(c.p_holm for c in by.values()) == pytest.approx(3 * min(c.p for c in by.values()))
    text = rp.tables(runs, study)
    assert "Holm-corrected p over the 3 contrasts" in text
    assert "| MSAM | 3,4,5,6,7,8 | " in text and "SGD, 2x epochs" not in text
    assert "| M1 | MSAM − SGD | 6 |" in text
    pytest.importorskip("matplotlib")
    paths = rp.figures(runs, tmp_path / "fig", study)
    assert [p.name for p in paths] == ["msam_contrasts.png", "msam_accuracy.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
