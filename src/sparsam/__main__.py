"""``sparsam`` / ``python -m sparsam``: a small registry of subcommands.

Each subcommand lives in a module with ``main(argv: list[str], prog: str) -> int`` and is imported
only when it is run, so ``sparsam --help`` stays fast and this entry point needs neither matplotlib,
tqdm nor scikit-learn. Adding a subcommand is one line in ``COMMANDS``.

Errors the user can fix (``sparsam.train.errors.UserError``) are printed as one line and exit
with status 2; set ``SPARSAM_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import traceback
import warnings
from typing import Any

#: name -> (module with main(argv, prog), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sparsam.cli.train", "train one model (presets reproduce the papers' tables)"),
    "demo": ("sparsam.cli.demo", "compare SGD, SAM, SSAM-F and SSAM-D on the built-in digits in ~1 minute"),
    "sweep": ("sparsam.cli.sweep", "run a grid of methods x sparsities x seeds, resumably"),
    "report": ("sparsam.cli.report", "tables (Markdown, CSV) and plots from run directories"),
    "analyze": ("sparsam.cli.analyze", "Hessian eigenvalues, sharpness, loss landscapes and mask densities of runs"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: sparsam COMMAND [options]   (or python -m sparsam COMMAND ...)",
        "",
        "Sharpness-Aware Minimization and Sparse SAM: training, sweeps, reports and analysis.",
        "",
        "commands:",
        *[f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items()],
        "",
        "`sparsam COMMAND --help` describes a command's options.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; returns the exit status (also when used as a console script)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        from . import __version__

        print(f"sparsam {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"sparsam: unknown command {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, _ = COMMANDS[name]
    prog = f"sparsam {name}"
    # Warnings read as the command's own lines ("sparsam train: warning: ..."), not as source locations.
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *args, **kwargs: f"{prog}: warning: {message}\n"
    interrupted: list[int] = []
    restore: Any = lambda: None  # noqa: E731
    try:  # Ctrl-C at any point, the imports included (torch, numpy: the first seconds), aborts cleanly
        # Inside the try: a Ctrl-C just after the handler is installed is the same clean abort (a
        # Ctrl-C before `restore` is bound leaves `note` installed, which raises as the default does).
        restore = _note_ctrl_c(interrupted)
        from .train.errors import UserError

        try:
            return int(importlib.import_module(module).main(rest, prog=prog) or 0)
        except UserError as e:
            if os.environ.get("SPARSAM_DEBUG"):
                traceback.print_exc()
            print(f"{prog}: error: {e}", file=sys.stderr)
            return e.exit_code
        except SystemExit as e:  # argparse: --help (0) or a usage error (2); main() returns the status
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print(f"\n{prog}: aborted", file=sys.stderr)
        return 130
    except Exception:
        if not interrupted:
            raise
        # Ctrl-C inside an import can leave a half-initialised module behind it (a numpy
        # AttributeError, seen): the interruption is what happened, so say that.
        print(f"\n{prog}: aborted", file=sys.stderr)
        return 130
    finally:
        restore()
        warnings.formatwarning = formatwarning


def _note_ctrl_c(interrupted: list[int]) -> Any:
    """While a command runs, Ctrl-C raises KeyboardInterrupt as usual and is also noted in
    ``interrupted``. Only replaces Python's default handler (not one an embedding program set, and
    not an ignored SIGINT). Returns what puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return lambda: None

    def note(signum: int, frame: Any) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    return lambda: signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
