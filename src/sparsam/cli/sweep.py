"""``sparsam sweep``: methods x sparsities x seeds, one run directory each, resumable.

Re-running the same command skips finished runs and resumes unfinished ones, so a sweep survives
crashes, Ctrl-C and time-limited job slots. Runs execute one after another in this process.
A re-run whose settings differ from those a run directory was made with is refused (naming the
settings) unless ``--redo`` asks to start those runs over. The root is locked while a sweep runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig, add_config_flags, build_config, diff_identity
from ..train.errors import ConfigError, UserError
from ..train.methods import METHODS, SPARSE_METHODS, method_values
from ._args import Parser

GRID_KEYS = ("methods", "sparsities", "seeds", "family", "train")
#: what ``sparsam sweep --help`` shows (``--help-all`` shows every option, all of ``sparsam train``'s too)
SHORT_HELP = (
    ("the grid", ["--root", "--methods", "--sparsities", "--seeds", "--family", "--grid"]),
    ("every run", ["--preset", "--config", "--data", "--model", "--epochs"]),
    ("the sweep", ["--dry-run", "--redo", "--report"]),
)


@dataclass
class SweepRun:
    name: str
    method: str
    sparsity: float | None
    seed: int
    config: TrainConfig


def _split_list(text: str, kind: type, flag: str) -> list[Any]:
    try:
        return [kind(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{flag} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None


def read_grid(path: str) -> dict[str, Any]:
    """A JSON grid file: {"methods": [...], "sparsities": [...], "seeds": [...], "family": "cifar10-resnet18",
    "train": {config keys}} (every key optional)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--grid {path}: no such file")
    try:
        grid = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"--grid {path} is not valid JSON: {e}") from None
    if not isinstance(grid, dict):
        raise ConfigError(f"--grid {path} must hold a JSON object")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"--grid {path}: unknown keys {unknown}; known: {', '.join(GRID_KEYS)}")
    return grid


def run_name(method: str, sparsity: float | None, seed: int) -> str:
    return f"{method}" + (f"-s{sparsity:g}" if sparsity is not None else "") + f"-seed{seed}"


def plan(
    root: str,
    methods: list[str],
    sparsities: list[float],
    seeds: list[int],
    layers: list[tuple[str, dict[str, Any]]],
    family: str | None = None,
) -> list[SweepRun]:
    """Every run of the grid (methods without a sparsity run once per seed), configs validated."""
    from ..train.presets import get_preset, list_presets

    runs: list[SweepRun] = []
    for method in methods:
        values = method_values(method)
        base: list[tuple[str, dict[str, Any]]] = []
        if family:
            name = f"{family}-{method}"
            if name not in list_presets():
                available = sorted(p for p in list_presets() if p.startswith(family + "-"))
                raise ConfigError(
                    f"--family {family} has no preset for method {method!r} (available: {', '.join(available) or 'none'})"
                )
            base.append((f"preset {name}", get_preset(name).values))
        for s in sparsities if method in SPARSE_METHODS else [None]:
            for seed in seeds:
                name = run_name(method, s, seed)
                grid_values: dict[str, Any] = {**values, "seed": seed, "out": str(Path(root) / name)}
                if s is not None:
                    grid_values["sparsity"] = s
                cfg = build_config([*base, *layers, (f"sweep grid ({name})", grid_values)])
                runs.append(SweepRun(name, method, s, seed, cfg))
    return runs


def main(argv: list[str], prog: str = "sparsam sweep") -> int:
    parser = Parser(
        prog=prog,
        short_help=SHORT_HELP,
        description="Run a grid of methods x sparsities x seeds (one run directory each under --root). Re-run the "
        "same command to continue: finished runs are skipped, unfinished ones resumed. Any `sparsam train` option "
        "applies to every run.",
        epilog="examples:\n"
        "  sparsam sweep --root runs/digits --methods sgd,sam,ssam-f,ssam-d --sparsities 0.5,0.9 --seeds 0,1,2 --epochs 10\n"
        "  sparsam sweep --root runs/c10 --family cifar10-resnet18 --methods sgd,sam,ssam-f,ssam-d --seeds 0,1,2 --download\n"
        "  sparsam sweep --root runs/x --grid grid.json\n"
        f"\nmethods: {', '.join(METHODS)} (sparsity applies to {', '.join(SPARSE_METHODS)})",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", required=True, metavar="DIR", help="folder that receives one run directory per run")
    parser.add_argument("--grid", metavar="FILE", help="JSON grid file (methods, sparsities, seeds, family, train)")
    parser.add_argument("--methods", metavar="LIST", help="comma-separated methods (default sgd,sam,ssam-f,ssam-d)")
    parser.add_argument(
        "--sparsities", metavar="LIST", help="comma-separated sparsities for SSAM methods (default 0.5)"
    )
    parser.add_argument("--seeds", metavar="LIST", help="comma-separated seeds (default 0)")
    parser.add_argument(
        "--family",
        metavar="NAME",
        help="preset family: each method starts from preset NAME-METHOD, "
        "e.g. cifar10-resnet18 (so SGD and SAM get their own weight decay)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    parser.add_argument(
        "--redo",
        action="store_true",
        help="start over every run whose directory was made with other settings (its files are "
        "deleted); without it such a re-run is refused",
    )
    parser.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write ROOT/report (table and plots) at the end",
    )
    from .train import add_layer_flags, config_layers

    add_layer_flags(parser)
    add_config_flags(parser)
    args = parser.parse_args(argv)
    for key, instead in (
        ("out", "--root"),
        ("opt", "--methods"),
        ("mask", "--methods"),
        ("seed", "--seeds"),
        ("sparsity", "--sparsities"),
    ):
        if hasattr(args, key):
            parser.error(f"--{key} is set per run by the sweep; use {instead}")

    grid = read_grid(args.grid) if args.grid else {}
    methods = (
        _split_list(args.methods, str, "--methods")
        if args.methods
        else grid.get("methods", ["sgd", "sam", "ssam-f", "ssam-d"])
    )
    sparsities = (
        _split_list(args.sparsities, float, "--sparsities") if args.sparsities else grid.get("sparsities", [0.5])
    )
    seeds = _split_list(args.seeds, int, "--seeds") if args.seeds else grid.get("seeds", [0])
    family = args.family or grid.get("family")
    for m in methods:
        method_values(m)
    layers = [(f"grid file {args.grid}", dict(grid.get("train", {})))] if grid.get("train") else []
    layers += config_layers(args)
    runs = plan(args.root, methods, sparsities, seeds, layers, family)

    from ..train import distributed as D
    from ..runs import rundir
    from ..train.engine import train

    rundir.resolve_dir(args.root, flag="--root")  # not a file, nor under one
    # One sweep per root at a time (rank 0 holds the lock under torchrun), for the sweep's lifetime.
    lock = (
        None
        if args.dry_run or os.environ.get("RANK", "0") != "0"
        else rundir.lock_dir(args.root, kind="sweep", flag="--root")
    )
    try:
        states = {r.name: rundir.state(r.config.out or "") for r in runs}
        changed = _changed_settings(runs, states)
        if args.dry_run:
            print(f"sweep of {len(runs)} runs under {args.root}", file=sys.stderr)
            for r in runs:
                print(f"  {'changed' if r.name in changed else states[r.name]:<9} {r.name}")
            return 0
        if changed and not args.redo:
            first, diffs = next(iter(changed.items()))
            more = f" (and {len(changed) - 1} more runs)" if len(changed) > 1 else ""
            raise ConfigError(
                f"--root {args.root} holds runs made with other settings: {first}: {'; '.join(diffs)}{more}. Run the "
                "sweep with the settings they were made with, choose another --root, or pass --redo to start those "
                "runs over (their files are deleted)"
            )
        for name in changed:
            states[name] = "redo"
        # Under torchrun the process group is made once for the whole sweep; every run uses it.
        info = D.setup(runs[0].config.device) if runs else None
        try:
            return _run_all(args, argv, runs, states, train, quiet_rank=info is not None and not info.is_main)
        finally:
            if info is not None:
                D.teardown(info)
    finally:
        if lock is not None:
            lock.release()


def _changed_settings(runs: list[SweepRun], states: dict[str, str]) -> dict[str, list[str]]:
    """{run name: ["--flag: saved X, now Y", ...]} for every run directory made with other settings."""
    from ..runs import rundir

    changed: dict[str, list[str]] = {}
    for r in runs:
        out = Path(r.config.out or "")
        if states[r.name] != "empty" and (out / rundir.CONFIG).is_file():
            diffs = diff_identity(rundir.read_run_config(out)["config"], r.config)
            if diffs:
                changed[r.name] = diffs
    return changed


def _run_all(
    args: argparse.Namespace,
    argv: list[str],
    runs: list[SweepRun],
    states: dict[str, str],
    train: Any,
    *,
    quiet_rank: bool,
) -> int:
    def log(msg: str) -> None:
        if not quiet_rank:
            print(msg, file=sys.stderr)

    log(
        f"sweep of {len(runs)} runs under {args.root}: "
        f"{sum(s == 'finished' for s in states.values())} finished, {sum(s == 'started' for s in states.values())} "
        f"started, {sum(s == 'empty' for s in states.values())} new"
        + (f", {sum(s == 'redo' for s in states.values())} to redo" if "redo" in states.values() else "")
    )
    for i, r in enumerate(runs, 1):
        state = states[r.name]
        if state == "finished":
            log(f"[{i}/{len(runs)}] {r.name}: finished, skipped")
            continue
        what = {"started": "resuming", "redo": "starting over (--redo: its settings changed)"}.get(state, "starting")
        log(f"[{i}/{len(runs)}] {r.name}: {what}")
        result = train(r.config, resume=state == "started", overwrite=state == "redo", argv=["sparsam", "sweep", *argv])
        if result.stopped == "interrupted":
            log(f"sweep interrupted during {r.name}; run the same command again to continue")
            return 130
        if not result.finished:
            log(f"sweep paused after {r.name} (--stop-after); run the same command again to continue")
            return 0
    if args.report and not quiet_rank:
        from .report import write_runs_report

        try:
            table = write_runs_report([args.root], Path(args.root) / "report")
        except UserError as e:
            print(f"no report: {e}", file=sys.stderr)
        else:
            print(table)
            print(f"report: {Path(args.root) / 'report' / 'report.md'}", file=sys.stderr)
    return 0
