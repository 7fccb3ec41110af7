"""The commands' argument parser: one-line errors with a "did you mean", and a short ``--help``.

``argparse`` answers a typo with the whole usage block and no suggestion. [`Parser`][] prints one
line instead (``sparsam train: error: unknown option --epoch (did you mean --epochs?) ...``, exit
status 2) and, given ``short_help``, shows only the options most runs need under ``-h/--help``;
``--help-all`` shows every option. ``short_help`` is a list of option names, so options added
later appear under ``--help-all`` without being listed here.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn

#: (group title, option names) pairs: what ``--help`` shows, in order
ShortHelp = Sequence[tuple[str, Sequence[str]]]

_CHOICE = re.compile(r"^argument (?P<arg>\S+): invalid choice: (?P<value>.+?) \(choose from (?P<choices>.*)\)$", re.S)


def _unquote(text: str) -> str:
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def _suggest(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class _HelpAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, full: bool = False, help: str | None = None) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)
        self.full = full

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        short = getattr(parser, "format_short_help", None)  # only Parser adds this action
        print(parser.format_help() if self.full or short is None else short())
        parser.exit()


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and whose ``--help`` can be short.

    Args:
        short_help: ``[(group title, [option names])]`` for ``-h/--help``; then ``--help-all``
            prints the full help. Empty: ``--help`` is argparse's full help.
        *args, **kwargs: as ``argparse.ArgumentParser`` (``add_help`` is decided here).
    """

    def __init__(self, *args: Any, short_help: ShortHelp = (), **kwargs: Any) -> None:
        kwargs["add_help"] = False
        kwargs.setdefault("allow_abbrev", False)  # --epoch must not silently mean --epochs
        super().__init__(*args, **kwargs)
        self.short_help = [(title, list(names)) for title, names in short_help]
        if self.short_help:
            self.add_argument("-h", "--help", action=_HelpAction, help="show the options most runs need and exit")
            self.add_argument("--help-all", action=_HelpAction, full=True, help="show every option and exit")
        else:
            self.add_argument("-h", "--help", action=_HelpAction, full=True, help="show this help and exit")

    # ------------------------------------------------------------------ errors
    def error(self, message: str) -> NoReturn:
        """One line on stderr, with a suggestion for a mistyped option or choice; exit status 2."""
        text = self.explain(message)
        if text.startswith(("unknown option", "argument ")):
            text += f"; `{self.prog} --help` lists the options"
        self.exit(2, f"{self.prog}: error: {text}\n")

    def explain(self, message: str) -> str:
        """argparse's error message as one line, with "did you mean" where a close match exists."""
        options = list(self._option_string_actions)
        if message.startswith("unrecognized arguments:"):
            words = message.split(":", 1)[1].split()
            unknown = [w for w in words if w.startswith("-") and not _is_number(w)]
            if unknown:
                parts = [f"{w}{_suggest(w.split('=', 1)[0], options)}" for w in unknown]
                return f"unknown option{'s' if len(parts) > 1 else ''} " + ", ".join(parts)
            return f"unexpected argument{'s' if len(words) > 1 else ''} {' '.join(words)}"
        m = _CHOICE.match(message)
        if m:
            value = _unquote(m.group("value"))
            choices = [_unquote(c) for c in m.group("choices").split(",")]
            return (
                f"argument {m.group('arg')}: invalid choice: {value!r}{_suggest(value, choices)}; "
                f"choose from {', '.join(choices)}"
            )
        return " ".join(message.split())

    # ------------------------------------------------------------------ the short help
    def format_short_help(self) -> str:
        """Usage, description, the ``short_help`` groups, and where the rest is."""
        width = min(shutil.get_terminal_size((100, 24)).columns, 120) - 2
        actions = self._option_string_actions
        lines = [f"usage: {self.prog} [options]", ""]
        if self.description:
            lines += [textwrap.fill(self.description, width), ""]
        groups = [
            (title, [(_invocation(actions[n]), actions[n].help or "") for n in names if n in actions])
            for title, names in self.short_help
        ]
        shown = sum(len(rows) for _, rows in groups)
        col = min(max((len(left) for _, rows in groups for left, _ in rows), default=0) + 2, 24)
        for title, rows in groups:
            lines.append(f"{title}:")
            for left, text in rows:
                indent = " " * (col + 2)
                first = f"  {left:<{col}}" if len(left) <= col - 2 else f"  {left}\n{indent}"
                wrapped = textwrap.wrap(text, max(width - col - 2, 30)) or [""]
                lines.append(first + wrapped[0])
                lines += [indent + w for w in wrapped[1:]]
            lines.append("")
        total = len({id(a) for a in actions.values()}) - 2  # less -h/--help and --help-all
        lines.append(f"These are {shown} of the {total} options; `{self.prog} --help-all` shows every one.")
        if self.epilog:
            lines += ["", self.epilog.rstrip()]
        return "\n".join(lines)


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _invocation(action: argparse.Action) -> str:
    """``--opt NAME`` / ``--resume [RUN_DIR_OR_CHECKPOINT]`` / ``--download, --no-download``."""
    flags = ", ".join(action.option_strings)
    if action.nargs == 0:
        return flags
    if action.metavar is not None:
        metavar = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices is not None:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        metavar = action.dest.upper()
    if action.nargs == "?":
        metavar = f"[{metavar}]"
    elif isinstance(action.nargs, int) and action.nargs > 1:
        metavar = " ".join([metavar] * action.nargs)
    return f"{action.option_strings[-1]} {metavar}"
