"""The documentation: every snippet runs, and the site builds in strict mode.

Snippet convention (also stated in docs/index.md):

* A fenced block opened by a line that is exactly ```` ```python ```` is a snippet. The snippets of
  one page run in order, in one fresh namespace, in a temporary working directory.
* Pages in ``RUN_ALL`` (this part of the project's pages): every snippet runs. A first line
  ``# docs: requires mod1 mod2`` runs the snippet only where those modules can be imported;
  ``# docs: skip`` is not allowed on these pages.
* Other pages: a snippet runs when its first line is ``# docs: run`` or ``# docs: requires ...``;
  ``# docs: skip`` (or no marker) means it is not run.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUN_ALL = {
    "index.md",
    "quickstart.md",
    "migrating.md",
    "conventions.md",
    "frameworks.md",
    "distributed_and_amp.md",
    "api.md",
    "reproducing.md",
}
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"^#\s*docs:\s*(run|skip|requires)\b(.*)$")


def snippets(page: Path) -> list[tuple[int, str, str, list[str]]]:
    """(line number, code, marker, required modules) for every ```python block of ``page``."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        code = m.group(1)
        line = text.count("\n", 0, m.start(1)) + 1
        first = code.split("\n", 1)[0].strip()
        mk = MARKER.match(first)
        marker, modules = (mk.group(1), mk.group(2).split()) if mk else ("", [])
        out.append((line, code, marker, modules))
    return out


def pages() -> list[str]:
    return sorted(p.name for p in DOCS.glob("*.md"))


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning 2.6 under torch 2.13
@pytest.mark.parametrize("name", pages())
def test_snippets_run(name, tmp_path, monkeypatch):
    page = DOCS / name
    owned = name in RUN_ALL
    blocks = snippets(page)
    if owned:
        skipped = [line for line, _, marker, _ in blocks if marker == "skip"]
        assert not skipped, f"{name}: '# docs: skip' is not allowed on this page (lines {skipped})"
    to_run = [b for b in blocks if owned or b[2] in ("run", "requires")]
    if not to_run:
        if owned:
            return  # a page of prose (api.md, reproducing.md)
        pytest.skip(f"{name}: no snippet marked to run")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    state = (torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_num_threads(), torch.random.get_rng_state())
    missing: list[str] = []
    ran = 0
    try:
        for line, code, marker, modules in to_run:
            absent = [mod for mod in modules if importlib.util.find_spec(mod) is None]
            if absent:
                missing += absent
                continue
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
            ran += 1
    finally:
        torch.set_default_dtype(state[0])
        torch.set_grad_enabled(state[1])
        torch.set_num_threads(state[2])
        torch.random.set_rng_state(state[3])
        accelerate_state = sys.modules.get("accelerate.state")
        if accelerate_state is not None:  # Accelerate's process-wide singletons, set by a snippet
            accelerate_state.AcceleratorState._reset_state(True)
            accelerate_state.GradientState._reset_state()
    if missing:  # reported as a skip so that the gap shows; the other snippets did run and pass
        pytest.skip(f"{name}: ran {ran} of {len(to_run)} snippets; the rest need {sorted(set(missing))}")


def test_owned_pages_exist_and_have_snippets():
    for name in RUN_ALL - {"api.md", "reproducing.md"}:
        assert snippets(DOCS / name), f"docs/{name} has no ```python snippet"


def test_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    nav = re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    absent = [n for n in nav if not (DOCS / n).exists()]
    assert not absent, f"pages in the mkdocs.yml nav that do not exist yet: {absent}"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()


def test_readme_snippets_run(tmp_path, monkeypatch):
    """Every ```python block of README.md runs, in order, in one namespace."""
    blocks = snippets(ROOT / "README.md")
    assert len(blocks) >= 2, "README.md lost its API examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs.README"}
    threads = torch.get_num_threads()
    try:
        for line, code, _, _ in blocks:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def test_ci_runs_the_readmes_test_command():
    """README's second set-up command is the test suite, and .ci/run runs exactly that."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Set up on a fresh machine", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in setup.strip().splitlines()]
    assert len(commands) == 2, commands
    assert commands[0].endswith("sparsam demo") and commands[1].endswith("python -m pytest"), commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci, f".ci/run does not run the README's test command {commands[1]!r}"
