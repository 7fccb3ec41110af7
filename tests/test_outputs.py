"""Paper-ready outputs: one precision rule and percent in every table, LaTeX (booktabs) beside
Markdown and CSV, figures in several formats with whole-epoch ticks and titles inside the canvas."""

from __future__ import annotations

import csv
import io

import pytest

from sparsam.train import build_config
from sparsam.runs.rundir import RunRecord
from sparsam.runs.tables import sig3, summarize, to_csv, to_latex, to_markdown


def _run(tmp_path, opt, seed, accs, epoch_time, **extra):
    cfg = {**build_config([("t", {"opt": opt, "epochs": len(accs), **extra})]).to_dict(), "seed": seed}
    rows = [
        {"epoch": i + 1, "test_acc": a, "epoch_time_s": epoch_time, "time_s": epoch_time * (i + 1)}
        for i, a in enumerate(accs)
    ]
    return RunRecord(tmp_path / f"{opt}{seed}", cfg, {}, rows, {"finished": True})


def test_sig3_keeps_three_significant_digits_and_trailing_zeros():
    assert [sig3(v) for v in (0.25, 0.514, 12.0, 2.0, 0.0912, 123.4, 1234.5)] == [
        "0.250",
        "0.514",
        "12.0",
        "2.00",
        "0.0912",
        "123",
        "1234",
    ]


@pytest.fixture()
def rows(tmp_path):
    runs = [
        _run(tmp_path, "sgd", 0, [0.5, 0.75], 0.25),
        _run(tmp_path, "sgd", 1, [0.5, 0.85], 0.25),
        _run(tmp_path, "ssam", 0, [0.6, 0.9], 0.514, mask="fisher", weight_decay=1e-3),
    ]
    return summarize(runs)


def test_markdown_times_share_one_precision_and_accuracy_is_percent(rows):
    table = to_markdown(*rows)
    assert "| SGD | — | 0.0005 | 2 | 80.00 ± 7.07 | 80.00 ± 7.07 | 2/2 | 0.250 | 1.00x | 0.500 (1/2) |" in table
    assert "| SSAM-F | 0.5 | 0.001 | 1 | 90.00 | 90.00 | 2/2 | 0.514 | 2.06x |" in table
    assert to_markdown(*rows, columns=("Seeds", "vs SGD")).splitlines()[0] == (
        "| Method | Sparsity | weight_decay | Seeds | vs SGD |"
    )
    with pytest.raises(ValueError, match="unknown table columns"):
        to_markdown(*rows, columns=("Speed",))


def test_csv_accuracy_is_percent(rows):
    records = list(csv.DictReader(io.StringIO(to_csv(*rows))))
    assert float(records[0]["final_acc_mean_pct"]) == pytest.approx(80.0)
    assert float(records[0]["final_acc_std_pct"]) == pytest.approx(7.0710678)
    assert float(records[1]["best_acc_mean_pct"]) == pytest.approx(90.0) and records[1]["final_acc_std_pct"] == ""


def test_latex_is_booktabs_with_the_markdown_numbers(rows):
    tex = to_latex(*rows, caption="Digits: 50% sparsity & more")
    lines = tex.splitlines()
    assert lines[:2] == [r"\begin{table}[t]", r"\centering"]
    assert r"\caption{Digits: 50\% sparsity \& more}" in lines
    assert [ln for ln in lines if ln.endswith("rule")] == [r"\toprule", r"\midrule", r"\bottomrule"]
    assert r"\begin{tabular}{lllrrrrrrrrr}" in lines
    assert r"Method & Sparsity & weight\_decay & Seeds & Final acc (\%) & Best acc (\%)" in tex
    assert r"SGD & -- & 0.0005 & 2 & 80.00 $\pm$ 7.07 & 80.00 $\pm$ 7.07 & 2/2 & 0.250 & 1.00x" in tex
    assert r"SSAM-F & 0.5 & 0.001 & 1 & 90.00 & 90.00 & 2/2 & 0.514 & 2.06x" in tex
    # every data row has as many cells as the header
    body = [ln for ln in lines if ln.endswith(r"\\")]
    assert len({ln.count(" & ") for ln in body}) == 1 and len(body) == 3


def test_accuracy_figure_formats_integer_epochs_and_a_title_inside(tmp_path, rows):
    pytest.importorskip("matplotlib")
    from sparsam.runs.figures import plot_accuracy

    groups = [r["group"] for r in rows[1]]
    title = "a long title that would run off a narrow one-panel figure on both of its sides if it were not wrapped"
    fig = plot_accuracy(groups, tmp_path / "acc.png", x="epoch", title=title, formats=("png", "pdf", "svg"))
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "acc.pdf").read_bytes()[:4] == b"%PDF"
    assert b"<svg" in (tmp_path / "acc.svg").read_bytes()[:500]
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)  # 2 epochs: no 1.2, 1.4, ...
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width  # the title lies inside the canvas
    with pytest.raises(ValueError, match="'jpg'"):
        plot_accuracy(groups, tmp_path / "acc.png", x="epoch", formats=("jpg",))


def test_report_writes_beside_the_runs_in_every_format_with_latex(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from sparsam.__main__ import main
    from sparsam.train import train

    from .test_train_engine import TINY

    root = tmp_path / "runs"
    for name, opt in (("a", "sgd"), ("b", "sam")):
        train(build_config([("t", {**TINY, "opt": opt, "epochs": 2, "out": str(root / name)})]), quiet=True)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["report", str(root / "a"), str(root / "b"), "--format", "png,pdf", "--title", "A & B"]) == 0
    out = root / "report"  # the folder that holds both runs, not the current folder
    assert list(elsewhere.iterdir()) == []
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed == f"wrote {out}: report.md, report.csv, report.tex, " + ", ".join(
        f"acc_vs_{x}.{f}" for x in ("epoch", "time", "compute") for f in ("png", "pdf")
    )
    tex = (out / "report.tex").read_text()
    assert r"\caption{A \& B}" in tex and r"\toprule" in tex and "SAM &" in tex
    assert (out / "acc_vs_epoch.pdf").read_bytes()[:4] == b"%PDF"
    # one run directory: the report goes into it
    assert main(["report", str(root / "a"), "--no-plots"]) == 0
    assert (root / "a" / "report" / "report.tex").is_file()
    assert main(["report", str(root), "--format", "gif"]) == 2
    assert "--format 'gif'" in capsys.readouterr().err


def test_a_failed_run_leaves_nothing_and_names_the_bad_value(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from sparsam.__main__ import main

    tiny = ["--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--threads", "1", "--no-progress"]
    (tmp_path / "keep").mkdir()
    out = tmp_path / "new" / "deeper" / "run"
    assert main(["train", *tiny, "--epochs", "1", "--model", "bogus", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--model 'bogus': unknown model 'bogus'" in err and "--width" not in err  # no "--width None"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # no empty parent folders either
    # a width the user gave is named
    assert main(["train", *tiny, "--epochs", "1", "--model", "bogus", "--width", "8", "--out", str(out)]) == 2
    assert "--model 'bogus' --width 8:" in capsys.readouterr().err
    # a folder that existed before is kept, empty or not
    assert main(["train", *tiny, "--epochs", "1", "--model", "bogus", "--out", str(tmp_path / "keep" / "r")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"] and list((tmp_path / "keep").iterdir()) == []


def test_the_image_cache_folder_is_printed_once_and_follows_sparsam_cache(tmp_path, monkeypatch, capsys):
    pytest.importorskip("PIL")
    from sparsam.data import image_folder, load_dataset

    from .test_data import make_folder

    make_folder(tmp_path / "ds", n=(1, 1))
    monkeypatch.setattr(image_folder, "_ANNOUNCED", set())
    monkeypatch.setenv("SPARSAM_CACHE", str(tmp_path / "mine"))
    load_dataset(tmp_path / "ds")
    load_dataset(tmp_path / "ds")  # from the cache now: not said again
    err = capsys.readouterr().err
    said = f"sparsam: decoded images are cached in {tmp_path / 'mine'} (set SPARSAM_CACHE to use another folder)"
    assert err.count(said) == 1 and len(list((tmp_path / "mine").glob("sparsam-*.npz"))) == 1
    load_dataset(tmp_path / "ds", cache=False)
    assert capsys.readouterr().err == ""  # no cache, no word


def test_train_prints_accuracy_in_percent(tmp_path, capsys):
    pytest.importorskip("sklearn")
    import json

    from sparsam.__main__ import main

    tiny = ["--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--threads", "1", "--no-progress"]
    assert main(["train", *tiny, "--epochs", "1", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    rec = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"train_acc {100 * rec['train_acc']:.2f}%" in err and f"test_acc {100 * rec['test_acc']:.2f}%" in err
    assert f"done: final test accuracy {100 * rec['test_acc']:.2f}%, best {100 * rec['test_acc']:.2f}% (epoch 1)" in err
