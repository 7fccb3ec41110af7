"""``sparsam train``: one training run. Config = defaults < --preset < --config FILE < flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig, add_config_flags, build_config, cli_values, read_config_file
from ..train.errors import RunDirError
from ._args import Parser

EPILOG = """examples:
  sparsam train                                            # SGD on the built-in digits, a few seconds
  sparsam train --opt ssam-f --sparsity 0.9 --epochs 5      # = --opt ssam --mask fisher
  sparsam train --preset cifar10-resnet18-ssam-f --download --out runs/c10-r18-ssamf
  sparsam train --resume runs/c10-r18-ssamf               # continue after a crash or Ctrl-C
  torchrun --nproc_per_node 4 -m sparsam train --preset imagenet-resnet50-ssam-f --data /data/imagenet --amp bf16
  sparsam train --list-presets
"""


def add_layer_flags(parser: argparse.ArgumentParser) -> None:
    """--preset and --config: the layers between the defaults and the flags."""
    parser.add_argument("--preset", metavar="NAME", help="start from a named preset (see --list-presets)")
    parser.add_argument("--config", metavar="FILE", help="a JSON or TOML file of settings (keys as in config.json)")


def config_layers(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """[(source, values)] from --preset, --config and the given flags, lowest first."""
    from ..train.presets import get_preset

    layers: list[tuple[str, dict[str, Any]]] = []
    if getattr(args, "preset", None):
        layers.append((f"preset {args.preset}", get_preset(args.preset).values))
    if getattr(args, "config", None):
        layers.append((str(args.config), read_config_file(args.config)))
    layers.append(("command line", cli_values(args)))
    return layers


#: what ``sparsam train --help`` shows (``--help-all`` shows every option)
SHORT_HELP = (
    ("start from", ["--preset", "--list-presets", "--config"]),
    ("data and model", ["--data", "--model", "--epochs", "--batch-size"]),
    ("method", ["--opt", "--mask", "--sparsity", "--rho", "--lr"]),
    ("the run", ["--out", "--resume", "--seed", "--device"]),
)


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog,
        description="Train one model with SGD, SAM, ASAM or SSAM and write a run directory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        short_help=SHORT_HELP,
    )
    add_layer_flags(parser)
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="continue the run in --out (or in the given run directory / checkpoint file)",
    )
    parser.add_argument("--overwrite", action="store_true", help="start over in a run directory that holds a run")
    add_config_flags(parser)
    return parser


def resolve(args: argparse.Namespace) -> TrainConfig:
    """The run's config. With --resume the saved config of the run replaces the defaults, so
    `--resume DIR` alone continues exactly; flags that contradict it are reported by the engine."""
    from ..runs import rundir

    layers = config_layers(args)
    cfg = build_config(layers)
    if not args.resume:
        return cfg
    if isinstance(args.resume, str):
        target = Path(args.resume).expanduser().resolve()
        if not target.exists():
            raise RunDirError(f"--resume {args.resume}: no such run directory or checkpoint")
        if target.is_file():
            if target.name != rundir.CHECKPOINT:
                why = (
                    f"{rundir.BEST} holds only the best epoch's weights"
                    if target.name == rundir.BEST
                    else f"to resume from a copy of a checkpoint, put it in place of {target.parent / rundir.CHECKPOINT}"
                )
                raise RunDirError(
                    f"--resume {args.resume}: a run resumes from its own {rundir.CHECKPOINT} (weights, optimizer, "
                    f"schedule and random states), and {target.name} is not it ({why})"
                )
            out = target.parent
        else:
            out = rundir.resolve_dir(target, flag="--resume")
        if cfg.out is not None and rundir.resolve_dir(cfg.out) != out:
            raise RunDirError(f"--resume {args.resume} and --out {cfg.out} name different run directories")
    else:
        out = rundir.resolve_dir(cfg.out or cfg.default_out())
    saved_path = out / rundir.CONFIG
    if not saved_path.is_file():
        raise RunDirError(
            f"--resume: {out} holds no run to resume (no {rundir.CONFIG}: a run there, if any, stopped before "
            f"writing anything); start the run without --resume"
        )
    # --stop-after limits one invocation; it is not inherited by the next one
    saved = {k: v for k, v in rundir.read_run_config(out)["config"].items() if k != "stop_after"}
    cfg = build_config([(f"saved config {saved_path}", saved), *layers])
    cfg.out = str(out)
    return cfg


def main(argv: list[str], prog: str = "sparsam train") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.list_presets:
        from ..train.presets import format_presets

        print(format_presets())
        return 0
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    cfg = resolve(args)
    from ..train.engine import train

    result = train(cfg, resume=bool(args.resume), overwrite=args.overwrite, argv=["sparsam", "train", *argv])
    if result.stopped == "interrupted":
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
