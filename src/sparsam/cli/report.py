"""``sparsam report``: run directories -> report.md, report.csv and accuracy plots."""

from __future__ import annotations

import argparse
import os

from ..train.errors import UserError


def write_report(paths: list[str], out: str | os.PathLike[str], *, plots: bool = True, title: str | None = None) -> str:
    """Write ``report.md``, ``report.csv`` and (with ``plots``) ``acc_vs_epoch.png``,
    ``acc_vs_time.png`` and ``acc_vs_compute.png`` into ``out``; return the Markdown table."""
    from ..train.checkpoint import write_text
    from ..train.rundir import find_runs, load_run, resolve_dir
    from ..train.tables import summarize, to_csv, to_markdown

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
            "\nFigures (acc_vs_epoch.png, acc_vs_time.png, acc_vs_compute.png): mean test accuracy, band ± one std "
            "over seeds; one panel per method family, SGD and SAM in every panel as the references.\n"
            if plots
            else ""
        )
        + f"\nRuns: {len(runs)} ({', '.join(str(d) for d in dirs[:6])}{', ...' if len(dirs) > 6 else ''})\n"
    )
    write_text(out / "report.md", header + table + notes, what="report")  # atomic: old or new, never half
    write_text(out / "report.csv", to_csv(varying, rows), what="report")
    if plots:
        from ..train.figures import plot_accuracy

        groups = [r["group"] for r in rows]
        plot_accuracy(groups, out / "acc_vs_epoch.png", x="epoch", varying=varying)
        plot_accuracy(groups, out / "acc_vs_time.png", x="time", varying=varying)
        plot_accuracy(groups, out / "acc_vs_compute.png", x="compute", varying=varying)
    return table


def main(argv: list[str], prog: str = "sparsam report") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Summarise run directories as a table like the papers' (mean ± std over seeds) in Markdown "
        "and CSV, with plots of test accuracy against epochs, training time and training compute.",
        epilog="example:\n  sparsam report runs/sweep            # every run directory under runs/sweep\n"
        "  sparsam report runs/a runs/b --out reports/ab",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_ROOT", help="run directories, or folders holding them")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="where to write report.md, report.csv and the plots "
        "(default: ROOT/report for a single folder, else ./report)",
    )
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write the PNG plots")
    parser.add_argument("--title", help="a title line for report.md")
    args = parser.parse_args(argv)
    for p in args.paths:
        if not os.path.isdir(p):
            raise UserError(f"{p}: no such directory")
    out = args.out or (os.path.join(args.paths[0], "report") if len(args.paths) == 1 else "report")
    table = write_report(args.paths, out, plots=args.plots, title=args.title)
    print(table)
    print(
        f"wrote {os.path.join(out, 'report.md')}, report.csv"
        + (", acc_vs_epoch.png, acc_vs_time.png, acc_vs_compute.png" if args.plots else "")
    )
    return 0
