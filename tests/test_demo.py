"""``sparsam demo``: its numbers agree with ``sparsam report``, its verdict on differences comes from
its own seeds, and it never replaces a training run it did not make."""

from __future__ import annotations

import json
import math

import pytest

from sparsam.__main__ import main
from sparsam.cli.demo import differences, is_demo_run, significance
from sparsam.train import build_config, train
from sparsam.runs.rundir import RunRecord
from sparsam.runs.tables import paired_difference, summarize

from .test_train_engine import TINY, metrics


def _record(tmp_path, opt, seed, final, **extra):
    cfg = {**build_config([("t", {"opt": opt, "epochs": 1, **extra})]).to_dict(), "seed": seed}
    rows = [{"epoch": 1, "test_acc": final, "epoch_time_s": 1.0, "time_s": 1.0}]
    return RunRecord(tmp_path / f"{opt}{seed}", cfg, {}, rows, {"finished": True})


def test_significance_is_the_95_percent_t_interval():
    mean, std, half = significance([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0) and half == pytest.approx(4.303 / math.sqrt(3))  # t(2) = 4.303
    _, _, half = significance([0.0, 1.0, 2.0, 3.0, 4.0])
    assert half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))  # t(4) = 2.776
    _, _, half = significance([0.0, 1.0] * 20)  # 39 degrees of freedom: the normal's 1.96
    assert half == pytest.approx(1.96 * 0.5063696835 / math.sqrt(40))
    assert significance([0.5]) == (0.5, None, None)
    assert significance([1.0, 1.0]) == (1.0, 0.0, 0.0)


def test_paired_difference_pairs_runs_by_seed(tmp_path):
    sgd = [_record(tmp_path, "sgd", s, a) for s, a in ((0, 0.5), (1, 0.6), (2, 0.7))]
    sam = [_record(tmp_path, "sam", s, a) for s, a in ((2, 0.9), (0, 0.8))]  # seed 1 missing, order shuffled
    _, rows = summarize(sgd + sam)
    g_sgd, g_sam = (r["group"] for r in rows)
    assert paired_difference(g_sam, g_sgd) == pytest.approx([0.3, 0.2])  # seeds 0 and 2


def test_differences_say_noise_or_not_from_the_seeds(tmp_path):
    # SAM beats SGD on every seed by 4 +- 1 points: more than noise; SSAM-F - SGD swings both ways: within noise
    sgd = [_record(tmp_path, "sgd", s, a) for s, a in ((0, 0.80), (1, 0.81), (2, 0.79))]
    sam = [_record(tmp_path, "sam", s, a) for s, a in ((0, 0.84), (1, 0.86), (2, 0.82))]
    ssam = [_record(tmp_path, "ssam", s, a, mask="fisher") for s, a in ((0, 0.83), (1, 0.79), (2, 0.78))]
    _, rows = summarize(sgd + sam + ssam)
    text = "\n".join(differences(rows))
    assert "paired by seed (3 seeds" in text
    sam_line = next(ln for ln in text.splitlines() if ln.strip().startswith("SAM - SGD"))
    half = 4.303 / math.sqrt(3)  # the 95% t-interval over three seeds
    interval = f"95% interval {4 - half:+.2f} to {4 + half:+.2f}"
    assert "+4.00 ± 1.00" in sam_line and f"more than seed noise ({interval})" in sam_line
    ssam_line = next(ln for ln in text.splitlines() if ln.strip().startswith("SSAM-F, 50% - SGD"))
    assert "within seed noise" in ssam_line
    assert "no method differs" not in text  # SAM does
    # a difference whose interval ends at 0.00 is at the edge: no claim either way, in words
    m = 4.303 / math.sqrt(3)  # differences m - 1, m, m + 1 points: the interval runs from 0 to 2m
    edge = [_record(tmp_path, "sam", s, a + d / 100) for s, a, d in ((0, 0.80, m - 1), (1, 0.81, m), (2, 0.79, m + 1))]
    edge_text = "\n".join(differences(summarize(sgd + edge)[1]))
    assert "at the edge of seed noise (95% interval " in edge_text and "0.00 to +4.97)" in edge_text
    assert "At this size, no method differs from SGD by more than seed noise." in edge_text
    # without SAM, nothing differs from SGD by more than noise, and the demo says so in words
    _, rows = summarize(sgd + ssam)
    assert "At this size, no method differs from SGD by more than seed noise." in differences(rows)
    # one seed: no verdict at all
    _, rows = summarize(sgd[:1] + sam[:1])
    text = "\n".join(differences(rows))
    assert "one seed: cannot be told from seed noise" in text and "--seeds 0,1,2,3,4" in text


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    return tmp_path_factory.mktemp("demo") / "demo"


def test_demo_prints_the_reports_time_ratio_and_writes_every_format(demo_root, capsys):
    args = ["demo", "--out", str(demo_root), "--epochs", "2", "--methods", "sgd,ssam-f", "--seeds", "0,1"]
    assert main([*args, "--format", "png,svg"]) == 0
    cap = capsys.readouterr()
    assert "paired by seed (2 seeds" in cap.out and "| SGD |" in cap.out and "1.00x" in cap.out
    assert (demo_root / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (demo_root / "demo.svg").read_bytes()[:500]
    for m in ("sgd", "ssam-f"):
        for seed in (0, 1):
            run = demo_root / m / f"seed{seed}"
            assert [r["epoch"] for r in metrics(run)] == [1, 2] and is_demo_run(run)
            assert json.loads((run / "config.json").read_text())["config"]["label_noise"] == 0.3
    demo_row = next(ln for ln in cap.out.splitlines() if ln.startswith("| SSAM-F |"))
    assert main(["report", str(demo_root), "--no-plots"]) == 0
    report_row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| SSAM-F |"))
    # the same ratio, to the digit, in the demo's table and in the report of the same runs
    demo_cells, report_cells = demo_row.split(" | "), report_row.split(" | ")
    assert demo_cells[-1].rstrip(" |") == report_cells[7] and report_cells[7].endswith("x")
    assert demo_cells[3] == report_cells[3]  # final accuracy, mean ± std


def test_demo_clears_its_own_runs_of_other_seeds_and_methods(demo_root, capsys):
    # the previous test left sgd and ssam-f with seeds 0 and 1; now only sgd, seed 0
    assert (
        main(["demo", "--out", str(demo_root), "--epochs", "1", "--methods", "sgd", "--seeds", "0", "--no-plot"]) == 0
    )
    out = capsys.readouterr().out
    assert "With one seed no difference can be told from seed noise" not in out  # only SGD: nothing to compare
    from sparsam.runs.rundir import find_runs

    assert find_runs([str(demo_root)]) == [(demo_root / "sgd" / "seed0").resolve()]
    assert not (demo_root / "ssam-f").exists()


def test_demo_refuses_to_replace_a_users_training_run(tmp_path, capsys):
    pytest.importorskip("sklearn")
    root = tmp_path / "root"
    user_run = root / "sam"
    train(build_config([("t", {**TINY, "opt": "sam", "epochs": 2, "out": str(user_run)})]), quiet=True)
    before = (user_run / "metrics.jsonl").read_bytes()
    assert not is_demo_run(user_run)
    assert main(["demo", "--out", str(root), "--epochs", "1", "--methods", "sgd,sam", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert str(user_run) in err and "the demo did not make" in err and "choose another --out" in err
    assert (user_run / "metrics.jsonl").read_bytes() == before  # the user's run is untouched
    assert sorted(p.name for p in root.iterdir()) == ["sam"]  # and nothing was written beside it
    # a user's run anywhere under the folder, e.g. where the demo would write seed 0, is refused too
    nested = tmp_path / "r2" / "sgd" / "seed0"
    train(build_config([("t", {**TINY, "epochs": 1, "out": str(nested)})]), quiet=True)
    assert main(["demo", "--out", str(tmp_path / "r2"), "--epochs", "1", "--methods", "sgd", "--no-plot"]) == 2
    assert str(nested) in capsys.readouterr().err and len(metrics(nested)) == 1


def test_demo_bad_seeds_and_formats_are_one_line_errors(tmp_path, capsys):
    for flag, value, says in (
        ("--seeds", "0,x", "comma-separated list of integers"),
        ("--seeds", "1,1", "distinct"),
        ("--format", "png,jpg", "png, pdf and/or svg"),
    ):
        assert main(["demo", "--out", str(tmp_path / "d"), flag, value]) == 2
        err = capsys.readouterr().err
        assert says in err and value in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()
