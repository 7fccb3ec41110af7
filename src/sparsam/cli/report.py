"""``sparsam report``: run directories -> report.md, report.csv, report.tex and accuracy plots."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..train.errors import UserError
from ._args import Parser


FIGURES = ("acc_vs_epoch", "acc_vs_time", "acc_vs_compute")
FORMATS = ("png", "pdf", "svg")


def parse_formats(text: str, flag: str = "--format") -> tuple[str, ...]:
    """``"png,pdf"`` -> ``("png", "pdf")``; a ``UserError`` naming the bad value otherwise."""
    formats = tuple(dict.fromkeys(f for f in text.replace(" ", "").lower().split(",") if f))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"{flag} {text!r}: use png, pdf and/or svg, comma-separated")
    return formats


def default_out(paths: list[str], name: str) -> Path:
    """Beside the runs read: ``name`` in the folder that holds every given path (a run directory
    itself when only one is given; a file's folder for a file)."""
    dirs = [os.path.abspath(p if os.path.isdir(p) else os.path.dirname(p) or ".") for p in paths]
    return Path(os.path.commonpath(dirs)) / name


def write_runs_report(
    paths: list[str],
    out: str | os.PathLike[str],
    *,
    plots: bool = True,
    title: str | None = None,
    formats: tuple[str, ...] = ("png",),
) -> str:
    """Write ``report.md``, ``report.csv``, ``report.tex`` (a booktabs table) and (with ``plots``)
    ``acc_vs_epoch``, ``acc_vs_time`` and ``acc_vs_compute`` in each of ``formats`` into ``out``;
    return the Markdown table."""
    from ..runs.checkpoint import write_text
    from ..runs.rundir import find_runs, load_run, resolve_dir
    from ..runs.tables import summarize, to_csv, to_latex, to_markdown

    dirs = find_runs(paths)
    if not dirs:
        raise UserError(f"no run directories (folders with config.json) found in {', '.join(paths)}")
    runs = [load_run(d) for d in dirs]  # each file checked: the first bad line or key stops the report
    varying, rows = summarize(runs)
    table = to_markdown(varying, rows)
    out = resolve_dir(out, flag="--out")  # a file, or a path under one, is refused
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    header = f"# {title}\n\n" if title else ""
    notes = (
        "\nAccuracy: test accuracy in %, mean ± sample std over seeds; final = last epoch, best = best epoch "
        "(the papers report the best). Time/epoch: median training time per epoch (evaluation excluded), "
        "mean over seeds; vs SGD: its ratio to the SGD row with the same data, model and batch settings. "
        "Compute: training compute of the run in SGD-step equivalents (forward+backward passes over a batch, "
        "counted by the optimizer, not timed; mean over seeds); Compute vs SGD: per epoch, relative to the SGD row.\n"
        + (
            f"\nFigures ({', '.join(f'{n}.{fmt}' for n in FIGURES for fmt in formats)}): mean test accuracy, band ± one std "
            "over seeds; one panel per method family, SGD and SAM in every panel as the references.\n"
            if plots
            else ""
        )
        + f"\nRuns: {len(runs)} ({', '.join(str(d) for d in dirs[:6])}{', ...' if len(dirs) > 6 else ''})\n"
    )
    write_text(out / "report.md", header + table + notes, what="report")  # atomic: old or new, never half
    write_text(out / "report.csv", to_csv(varying, rows), what="report")
    write_text(out / "report.tex", to_latex(varying, rows, caption=title), what="report")
    if plots:
        from ..runs.figures import plot_accuracy

        groups = [r["group"] for r in rows]
        for name in FIGURES:
            x = name.rsplit("_", 1)[1]
            plot_accuracy(groups, out / f"{name}.{formats[0]}", x=x, varying=varying, formats=formats)
    return table


def main(argv: list[str], prog: str = "sparsam report") -> int:
    parser = Parser(  # one-line errors with 'did you mean', as train and sweep
        prog=prog,
        description="Summarise run directories as a table like the papers' (mean ± std over seeds) in Markdown, "
        "CSV and LaTeX (booktabs), with plots of test accuracy against epochs, training time and training compute.",
        epilog="example:\n  sparsam report runs/sweep            # every run directory under runs/sweep\n"
        "  sparsam report runs/a runs/b --out reports/ab",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_ROOT", help="run directories, or folders holding them")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="where to write report.md, report.csv, report.tex and the plots (default: beside the runs read, "
        "in the folder holding every given path: RUN_DIR_OR_ROOT/report for one)",
    )
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write the plots")
    parser.add_argument(
        "--format", default="png", metavar="LIST", help="plot formats, comma-separated: png, pdf, svg (default png)"
    )
    parser.add_argument("--title", help="a title line for report.md (and the caption of report.tex)")
    args = parser.parse_args(argv)
    formats = parse_formats(args.format)
    for p in args.paths:
        if not os.path.isdir(p):
            raise UserError(f"{p}: no such directory")
    out = Path(args.out) if args.out else default_out(args.paths, "report")
    table = write_runs_report(args.paths, out, plots=args.plots, title=args.title, formats=formats)
    print(table)
    files = ["report.md", "report.csv", "report.tex"]
    if args.plots:
        files += [f"{n}.{fmt}" for n in FIGURES for fmt in formats]
    print(f"wrote {os.path.abspath(out)}: {', '.join(files)}")
    return 0
