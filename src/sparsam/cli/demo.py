"""``sparsam demo``: SGD, SAM, SSAM-F and SSAM-D on the built-in digits, side by side, over seeds.

The setting is one where the methods can be told apart in under a minute of CPU: a SmallCNN trained
for 30 epochs on 300 of the digits' training images (30 per class), 30% of whose labels are
flipped to another class (the test set stays clean), ρ = 0.1, each method over five seeds
(preset ``digits-smallcnn-<method>`` for everything else). With noisy labels, plain SGD ends up
fitting the flipped labels; SAM resists that (Foret et al., 2021, report the same on CIFAR with
label noise). The demo prints the report's table (``sparsam report``: the same numbers, the same
time ratio) and the paired differences of final test accuracy over the seeds, saying for each
whether its 95% t-interval over the seeds leaves out zero, and plots test accuracy per epoch (``demo.png``).

Every run directory ``OUT/<method>/seed<k>`` is the demo's own: it is recorded in the run's
``config.json`` (``argv`` starts with ``sparsam demo``), and the demo refuses to write into a
folder that holds a run it did not make.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from ..train.config import build_config
from ..train.errors import ConfigError, UserError
from ..train.methods import METHODS, method_values
from ._args import Parser

DEFAULT_METHODS = ("sgd", "sam", "ssam-f", "ssam-d")
#: what the demo changes in the ``digits-smallcnn`` preset (see the module docstring)
DEMO_SETTINGS: dict[str, Any] = {
    "train_subset": 300,
    "label_noise": 0.3,
    "epochs": 30,
    "batch_size": 32,
    "rho": 0.1,
    "mask_update_epochs": 5,
}
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
#: the first two words of a demo run's recorded command line
DEMO_ARGV = ("sparsam", "demo")


def is_demo_run(path: str | Path) -> bool:
    """Whether the run directory ``path`` was made by ``sparsam demo`` (its ``config.json``
    records the command line ``sparsam demo ...``)."""
    import json

    try:
        meta = json.loads((Path(path) / "config.json").read_bytes())
    except (OSError, ValueError):  # unreadable, not UTF-8 or not JSON: not a run the demo can vouch for
        return False
    argv = meta.get("argv") if isinstance(meta, dict) else None
    return isinstance(argv, list) and tuple(argv[:2]) == DEMO_ARGV


def check_out(out: Path, targets: list[Path]) -> list[Path]:
    """Refuse an ``out`` that holds a training run the demo did not make (``UserError`` naming it
    and saying how to proceed); return the demo's own earlier runs there that this demo will not
    rewrite (other methods or seeds, the one-seed layout ``OUT/<method>``), to be cleared."""
    from ..runs.rundir import CONFIG, find_runs

    if (out / CONFIG).is_file() and not is_demo_run(out):
        raise UserError(
            f"demo --out {out}: that folder is a training run the demo did not make; the demo writes its own "
            f"runs into OUT/<method>/seed<k>. Choose another --out (for example --out {out.parent / 'demo'})"
        )
    runs = find_runs([str(out)]) if out.is_dir() else []
    foreign = [r for r in runs if not is_demo_run(r)]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise UserError(
            f"demo --out {out}: {foreign[0]}{more} holds a training run the demo did not make, and the demo "
            f"replaces the runs in its folder. Nothing was changed: choose another --out (for example "
            f"--out {out / 'demo'}), or move that run elsewhere"
        )
    wanted = {t.resolve() for t in targets}
    return [r for r in runs if r.resolve() not in wanted]


def _clear_run(run: Path) -> None:
    """Remove a demo run's files, and its folder (and an emptied method folder) if nothing else is there."""
    from ..runs import rundir

    rundir.clear(run)
    for d in (run, run.parent):
        try:
            d.rmdir()  # only when empty
        except OSError:
            break


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise UserError(f"--seeds {text!r}: give seeds as a comma-separated list of integers, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: give distinct non-negative integers, e.g. 0,1,2")
    return seeds


def _formats(text: str) -> list[str]:
    formats = [f for f in text.replace(" ", "").lower().split(",") if f]
    bad = [f for f in formats if f not in ("png", "pdf", "svg")]
    if bad or not formats:
        raise UserError(f"--format {text!r}: use png, pdf and/or svg, comma-separated")
    return list(dict.fromkeys(formats))


# Two-sided 95% quantiles of Student's t by degrees of freedom (standard tables); beyond 30, the normal's.
_T975: tuple[float, ...] = (
    *(12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131),
    *(2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042),
)


def significance(diffs: list[float]) -> tuple[float, float | None, float | None]:
    """(mean, sample std, half-width of the 95% t-interval of the mean) of paired differences; the
    std and the half-width are ``None`` with fewer than two values."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, None, None
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, std, t * std / math.sqrt(n)


def differences(rows: list[dict[str, Any]], ref: str = "SGD") -> list[str]:
    """Lines of the paired differences of final test accuracy (points of %) between each method and
    ``ref`` (SGD), and between each SSAM and SAM, over the seeds both have; a difference is called
    more than seed noise when its 95% t-interval over the seeds leaves out zero (at the edge when the
    interval's near end rounds to zero at two decimals)."""
    from ..runs.figures import method_styles
    from ..runs.tables import paired_difference

    groups = [r["group"] for r in rows]
    labels = [s.label for s in method_styles([g.settings for g in groups])]
    first = {r["method"]: i for i, r in reversed(list(enumerate(rows)))}  # the first row of SGD, of SAM
    pairs = [(i, first[ref]) for i in range(len(rows)) if ref in first and i != first[ref]]
    pairs += [(i, first["SAM"]) for i, r in enumerate(rows) if r["method"].startswith("SSAM") and "SAM" in first]
    if not pairs:
        return []
    lines = []
    width = max(len(f"{labels[a]} - {labels[b]}") for a, b in pairs)
    exceeded = False
    n_seeds = 0
    for ia, ib in pairs:
        a, b = labels[ia], labels[ib]
        diffs = paired_difference(groups[ia], groups[ib])
        if not diffs:
            continue
        n_seeds = max(n_seeds, len(diffs))
        mean, std, half = significance([100 * d for d in diffs])
        if std is None or half is None:
            lines.append(f"  {a + ' - ' + b:<{width}}  {mean:+6.2f}  one seed: cannot be told from seed noise")
            continue
        interval = f"95% interval {mean - half:+.2f} to {mean + half:+.2f}"
        if round(abs(mean) - half, 2) == 0:  # the interval's near end rounds to zero: no claim either way
            verdict = f"at the edge of seed noise ({interval})"
        elif abs(mean) > half:
            verdict = f"more than seed noise ({interval})"
            exceeded = exceeded or ib == first[ref]
        else:
            verdict = f"within seed noise ({interval})"
        lines.append(f"  {a + ' - ' + b:<{width}}  {mean:+6.2f} ± {std:<5.2f}  {verdict}")
    head = f"Final test accuracy, paired by seed ({n_seeds} seed{'s' if n_seeds != 1 else ''}; points of %, ± std):"
    tail = []
    if n_seeds < 2:
        tail = ["With one seed no difference can be told from seed noise: give --seeds 0,1,2,3,4."]
    elif not exceeded:
        tail = [f"At this size, no method differs from {ref} by more than seed noise."]
    return [head, *lines, *tail]


def main(argv: list[str], prog: str = "sparsam demo") -> int:
    parser = Parser(  # one-line errors with 'did you mean', as train and sweep
        prog=prog,
        description="Train SGD, SAM, SSAM-F and SSAM-D on scikit-learn's digits (no download) with 30% of the "
        "training labels flipped, over five seeds; print the comparison table and the differences between the "
        "methods (with whether each exceeds the seeds' spread), and plot test accuracy per epoch. "
        "About 45 s of CPU time (one thread).",
        epilog="The run directories OUT/<method>/seed<k> are the demo's own and are replaced on every demo run "
        "(a folder holding another training run is refused); `sparsam report OUT` reads them.",
        allow_abbrev=False,
    )
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        metavar="LIST",
        help=f"comma-separated methods among {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--seeds",
        default=",".join(map(str, DEFAULT_SEEDS)),
        metavar="LIST",
        help="comma-separated seeds, the same for every method (default 0,1,2,3,4)",
    )
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default {DEMO_SETTINGS['epochs']})")
    parser.add_argument(
        "--label-noise",
        type=float,
        default=None,
        metavar="FRACTION",
        help=f"fraction of training labels flipped (default {DEMO_SETTINGS['label_noise']}; 0: clean labels)",
    )
    parser.add_argument("--sparsity", type=float, default=None, help="SSAM sparsity (default 0.5)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: fastest for this tiny model, and fair to a busy machine)",
    )
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write demo.png")
    parser.add_argument(
        "--format", default="png", metavar="LIST", help="figure formats, comma-separated: png, pdf, svg (default png)"
    )
    args = parser.parse_args(argv)

    from ..train.engine import train
    from ..train.presets import get_preset, list_presets
    from ..runs.rundir import resolve_dir

    methods = list(dict.fromkeys(m for m in args.methods.replace(" ", "").split(",") if m))
    if not methods:
        raise UserError(f"--methods {args.methods!r}: name at least one of {', '.join(METHODS)}")
    seeds = _seeds(args.seeds)
    formats = _formats(args.format)
    out = resolve_dir(args.out, flag="--out")  # a file, or a path under one, is refused here
    configs: dict[tuple[str, int], Any] = {}
    for m in methods:
        values = method_values(m)  # an unknown method: ConfigError naming the known ones
        for seed in seeds:
            over = {
                **DEMO_SETTINGS,
                **values,
                "out": str(out / m / f"seed{seed}"),
                "seed": seed,
                "progress": False,
                "threads": args.threads,
            }
            for key in ("epochs", "label_noise", "sparsity"):
                if getattr(args, key) is not None:
                    over[key] = getattr(args, key)
            preset = f"digits-smallcnn-{m}"
            base = get_preset(preset if preset in list_presets() else "digits-smallcnn-sgd").values
            try:
                configs[m, seed] = build_config([("preset digits-smallcnn", base), ("demo", over)])
            except ConfigError as e:
                raise UserError(f"demo: {e}") from None
    stale = check_out(out, [Path(str(c.out)) for c in configs.values()])
    for run in stale:  # the demo's own runs of other methods or seeds: they would mix into `sparsam report OUT`
        _clear_run(run)
    cfg0 = next(iter(configs.values()))
    noise = f"{100 * cfg0.label_noise:g}% of their labels flipped" if cfg0.label_noise else "clean labels"
    print(
        f"demo: {', '.join(methods)} on digits ({cfg0.train_subset} training images, {noise}), "
        f"SmallCNN, {cfg0.epochs} epochs, "
        f"seeds {','.join(map(str, seeds))}; writing {out}",
        file=sys.stderr,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, seed in enumerate(seeds):
        order = methods if i % 2 == 0 else list(reversed(methods))  # A B C D, then D C B A: fair to a busy machine
        accs: dict[str, float | None] = {}
        for m in order:
            r = train(configs[m, seed], overwrite=True, quiet=True, argv=[*DEMO_ARGV, *argv])
            if r.stopped == "interrupted":
                print("demo interrupted", file=sys.stderr)
                return 130
            accs[m] = r.final_test_acc
        print(
            f"  seed {seed}: final test accuracy "
            + "  ".join(f"{m} {100 * a:.1f}%" for m in methods if (a := accs.get(m)) is not None)
            + f"  ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
        )
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    from ..runs import rundir
    from ..runs.tables import summarize, to_markdown

    runs = [rundir.load_run(Path(str(configs[m, s].out))) for m in methods for s in seeds]
    varying, rows = summarize(runs)
    print(to_markdown(varying, rows, columns=("Seeds", "Final acc (%)", "Best acc (%)", "Time/epoch (s)", "vs SGD")))
    print(
        f"Test accuracy on the 360 held-out digits (clean labels), mean ± std over seeds. Time/epoch: median "
        f"training time per epoch; vs SGD: its ratio to SGD's (as in `sparsam report`). Training took {total:.0f} s "
        f"of wall-clock time and {cpu:.0f} s of CPU time.\n"
    )
    print("\n".join(differences(rows)))
    if args.plot:
        from ..runs.figures import plot_accuracy
        from ..runs.tables import curves

        paths = [out / f"demo.{fmt}" for fmt in formats]
        # the accuracy axis spans the last three quarters of training (where the methods part), not epoch 1
        late = [100 * a for r in rows for a in curves(r["group"])["acc_mean"][cfg0.epochs // 4 :]]
        ylim = (math.floor(min(late)) - 3.0, min(100.0, math.ceil(max(late)) + 2.0)) if late else None
        plot_accuracy(
            [r["group"] for r in rows],
            paths[0],
            x="epoch",
            title=f"digits, SmallCNN, {cfg0.train_subset} training images, {noise}: test accuracy",
            formats=formats,
            ylim=ylim,
        )
        print(f"figure: {', '.join(str(p) for p in paths)}")
    print(f"runs: {out} (sparsam report {out} writes the full report beside them)")
    return 0
