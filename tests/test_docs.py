"""The documentation: every snippet runs, the site builds in strict mode, and the built pages show a
reader nothing they should not see.

Snippets: every fenced block opened by ```` ```python ```` in docs/*.md and README.md runs. The blocks
of one page run in order, in one fresh namespace, in a temporary working directory. A block that
must not run (it downloads a data set, needs a GPU, shows a signature) is opened with
```` ```python {.no-run} ```` instead, which renders the same. A block that imports a package that
is not installed (`transformers`, say) is skipped, and the page's test reports the skip.

The built site is checked page by page for what a reader should never see: reStructuredText roles
and directives, raw LaTeX, literal-block ``::`` markers, doctest prompts in prose, snippet markers,
repository-internal and temporary paths, escaped table pipes, list items run together in a paragraph,
emphasis eaten from a ``*`` inside a word, Markdown tables shown as code, a stylesheet rule that cuts
table cells, a figure displayed below ``MIN_IMAGE_SCALE`` of its size, and, on the pages written for
users, the words of our own process (issue numbers, work sessions, signals sent to runs, commit
hashes, test names, machine-load notes). The API reference (one page per area) must show every public
name once, with its signature, whole "Returns" sections, no repository paths and every `TrainConfig`
field. Each rule is shown to fire on a planted defect in ``test_the_checks_catch_what_they_are_for``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SRC = ROOT / "src"
FENCE = re.compile(r"^```python(?P<info>[^\n`]*)\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
# Pages that teach by example: each must keep at least one snippet that runs.
PAGES_WITH_SNIPPETS = {
    "index.md",
    "quickstart.md",
    "migrating.md",
    "conventions.md",
    "frameworks.md",
    "distributed_and_amp.md",
    "masks.md",
    "models_and_data.md",
    "training.md",
    "analysis.md",
}
# The modules whose public names (their `__all__`) the API reference must show.
PUBLIC_MODULES = [
    "sparsam",
    "sparsam.optim.schedule",
    "sparsam.optim.looksam",
    "sparsam.optim.esam",
    "sparsam.optim.asam",
    "sparsam.optim.msam",
    "sparsam.masks",
    "sparsam.integrations",
    "sparsam.integrations.lightning",
    "sparsam.integrations.accelerate",
    "sparsam.integrations.transformers",
    "sparsam.analysis",
    "sparsam.models",
    "sparsam.data",
    "sparsam.train",
]


@dataclass
class Snippet:
    line: int
    code: str
    run: bool


def snippets(page: Path) -> list[Snippet]:
    """Every ```python block of ``page``, with whether it is meant to run."""
    text = page.read_text(encoding="utf-8")
    return [
        Snippet(text.count("\n", 0, m.start("code")) + 1, m.group("code"), ".no-run" not in m.group("info"))
        for m in FENCE.finditer(text)
    ]


def missing_modules(code: str) -> list[str]:
    """Top-level packages that ``code`` imports and that are not installed (sparsam's are always there)."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if n != "sparsam" and importlib.util.find_spec(n) is None)


def run_page(label: str, blocks: list[Snippet], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run the blocks in order in one namespace; returns the modules whose absence skipped blocks."""
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs.{Path(label).stem}"}
    state = (torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_num_threads(), torch.random.get_rng_state())
    missing: list[str] = []
    try:
        for block in blocks:
            absent = missing_modules(block.code)
            if absent:
                missing += absent
                continue
            exec(compile(block.code, f"{label}:{block.line}", "exec"), namespace)
    finally:
        torch.set_default_dtype(state[0])
        torch.set_grad_enabled(state[1])
        torch.set_num_threads(state[2])
        torch.random.set_rng_state(state[3])
        accelerate_state = sys.modules.get("accelerate.state")
        if accelerate_state is not None:  # Accelerate's process-wide singletons, set by a snippet
            accelerate_state.AcceleratorState._reset_state(True)
            accelerate_state.GradientState._reset_state()
    return sorted(set(missing))


def pages_with_runnable_snippets() -> list[str]:
    return sorted(p.name for p in DOCS.glob("*.md") if any(s.run for s in snippets(p)))


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning 2.6 under torch 2.13
@pytest.mark.parametrize("name", pages_with_runnable_snippets())
def test_snippets_run(name, tmp_path, monkeypatch):
    blocks = [s for s in snippets(DOCS / name) if s.run]
    missing = run_page(f"docs/{name}", blocks, tmp_path, monkeypatch)
    if missing:  # reported as a skip so that the gap shows; the other snippets did run and pass
        pytest.skip(f"{name}: snippets importing {missing} were skipped (not installed)")


def test_readme_snippets_run(tmp_path, monkeypatch):
    """Every ```python block of README.md runs, in order, in one namespace."""
    blocks = snippets(ROOT / "README.md")
    assert sum(s.run for s in blocks) >= 2, "README.md lost its API examples"
    missing = run_page("README.md", [s for s in blocks if s.run], tmp_path, monkeypatch)
    assert not missing, f"README.md snippets need {missing}"


def test_teaching_pages_keep_runnable_snippets():
    for name in sorted(PAGES_WITH_SNIPPETS):
        assert any(s.run for s in snippets(DOCS / name)), f"docs/{name} has no ```python snippet that runs"


def test_snippet_conventions():
    """The fence forms the runner understands, and nothing it would silently ignore."""
    for page in [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            info = m.group("info").strip()
            assert info in ("", "{.no-run}"), (
                f"{page.name}: unknown fence info {info!r} (use ```python or ```python {{.no-run}})"
            )
            first = m.group("code").lstrip().split("\n", 1)[0]
            assert not re.match(r"#\s*docs\s*:", first), f"{page.name}: a '# docs:' marker line (no longer used)"
        # ```py / ```python3 / ```pycon would render like Python but never run.
        other = re.findall(r"^```(py|python3|pycon|ipython)\b", text, re.M)
        assert not other, f"{page.name}: ```{other[0]} blocks are not run; use ```python or ```python {{.no-run}}"


def test_ci_runs_the_readmes_test_command():
    """README's second set-up command is the test suite, and .ci/run runs exactly that."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Set up on a fresh machine", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in setup.strip().splitlines()]
    assert len(commands) == 2, commands
    assert commands[0].endswith("sparsam demo") and commands[1].endswith("python -m pytest"), commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci, f".ci/run does not run the README's test command {commands[1]!r}"


# ---------------------------------------------------------------------------------------------------
# The built site


@dataclass
class Built:
    returncode: int
    log: str
    site: Path
    pages: dict[str, Page] = field(default_factory=dict)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """The site, built once (strict) for every check of this module."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path_factory.mktemp("docs") / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    out = Built(result.returncode, result.stderr[-4000:], site)
    if result.returncode == 0:
        for path in sorted(site.rglob("*.html")):
            out.pages[path.relative_to(site).as_posix()] = Page.parse(path.read_text(encoding="utf-8"))
    return out


def test_site_builds_in_strict_mode(built):
    nav = re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    absent = [n for n in nav if not (DOCS / n).exists()]
    assert not absent, f"pages in the mkdocs.yml nav that do not exist: {absent}"
    assert built.returncode == 0, built.log
    assert "api/index.html" in built.pages and "api/optimizers/index.html" in built.pages


BLOCK_TAGS = {
    "p",
    "li",
    "td",
    "th",
    "div",
    "pre",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "dd",
    "dt",
    "br",
    "tr",
    "table",
    "details",
    "summary",
    "blockquote",
    "section",
    "nav",
    "ul",
    "ol",
}


class Page(HTMLParser):
    """A built page as the reader sees it: its text (prose apart from code blocks), comments, links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.prose: list[str] = []  # text outside <pre>, with "\n" at block boundaries
        self.code: list[str] = []  # the text of each <pre>
        self.inline_code: list[str] = []  # text inside <code> outside <pre>
        self.comments: list[str] = []
        self.urls: list[str] = []
        self.images: list[dict[str, str]] = []  # the attributes of every <img>
        self.html = ""
        self._pre = 0
        self._code = 0
        self._hidden = 0  # <script>, <style>, <template>, and the API reference's source listings
        self._details: list[bool] = []  # open <details>: whether each is a source listing

    @classmethod
    def parse(cls, html: str) -> Page:
        page = cls()
        page.html = html
        page.feed(html)
        page.close()
        return page

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "template"):
            self._hidden += 1
        elif tag == "details":
            # the source code of an API entry is code, not text written for the reader
            source = "mkdocstrings-source" in (dict(attrs).get("class") or "")
            self._details.append(source)
            self._hidden += source
        elif tag == "pre":
            self._pre += 1
            self.code.append("")
        elif tag == "code":
            self._code += 1
        if tag in BLOCK_TAGS:
            self.prose.append("\n")
        self.urls += [v for k, v in attrs if k in ("href", "src") and v]
        if tag == "img":
            self.images.append({k: v or "" for k, v in attrs})

    def handle_endtag(self, tag):
        if tag in ("script", "style", "template"):
            self._hidden = max(0, self._hidden - 1)
        elif tag == "details" and self._details:
            self._hidden = max(0, self._hidden - self._details.pop())
        elif tag == "pre":
            self._pre = max(0, self._pre - 1)
        elif tag == "code":
            self._code = max(0, self._code - 1)
        if tag in BLOCK_TAGS:
            self.prose.append("\n")

    def handle_data(self, data):
        if self._hidden:
            return
        if self._pre:
            self.code[-1] += data
        else:
            self.prose.append(data)
            if self._code:
                self.inline_code.append(data)

    def handle_comment(self, data):
        self.comments.append(data)

    @property
    def text(self) -> str:
        return "".join(self.prose) + "\n" + "\n".join(self.code)


LATEX_COMMANDS = (
    "frac dfrac tfrac sum prod int nabla partial sqrt cdot cdots ldots dots times lambda Lambda phi varphi rho "
    "epsilon varepsilon sigma Sigma alpha beta gamma delta Delta theta mu top mathbb mathcal mathrm mathbf "
    "operatorname text textbf left right langle rangle lVert rVert Vert lvert rvert leq geq neq le ge approx "
    "odot otimes hat tilde bar mid begin end quad qquad infty sim propto"
).split()

# Pages written for users. The others may name tests, sessions and the history of measurements:
# the evidence pages, the design notes for contributors.
EVIDENCE_PAGES = {"validation/index.html", "design/index.html", "RESULTS/index.html", "differences/index.html"}

# Rules that docs/RESULTS.md does not pass yet. It is being rewritten with a new replication, and the
# rewrite must pass them: remove a rule from this set once it does.
RESULTS_PENDING = {
    "figure displayed below the minimum scale",  # regime_acc_vs_epoch.png, convergence*.png: 62-68%
}

# name -> (pattern, where to look, which pages: "all", "user" (not EVIDENCE_PAGES) or "api")
TEXT_RULES = {
    "reStructuredText role": (
        r"(?<![\w:]):(?:py:)?(?:meth|class|func|math|attr|mod|obj|exc|data|ref|const|term|doc|cite):(?=\S)",
        "text",
        "all",
    ),
    "reStructuredText directive": (r"(?:^|\s)\.\. [a-z][\w-]*::", "text", "all"),
    "raw LaTeX": (
        r"\\(?:" + "|".join(LATEX_COMMANDS) + r")(?![A-Za-z])|\$\$|(?<!\\)\\[()\[\]](?=\s*[\w\\])",
        "text",
        "all",
    ),
    "literal-block '::' marker": (r"[^\s:]::[ \t]*\n", "prose", "all"),
    "doctest prompt outside a code block": (r">>>", "prose", "all"),
    "escaped table pipe": (r"\\\|", "text", "all"),
    "'# docs:' snippet marker": (r"#\s*docs\s*:", "text+comments", "all"),
    "repository-internal path": (
        r"\.\./shared|shared/data|/work/|/tmp/team|/tmp/bash_jobs",
        "text+comments+urls",
        "all",
    ),
    "temporary or scratch path": (
        r"(?<![\w.~])/tmp/|/var/tmp/|\$TMPDIR\b|/dev/shm/|(?<![\w.])scratch/",
        "text+comments+urls",
        "all",
    ),
    # what our process looks like, on pages written for users
    "issue number": (r"(?i)\bissues?\s+#?\d+|\bPR\s*#\d+", "prose", "user"),
    "work session": (
        r"(?i)\b(?:this|that|the previous|previous|last|an earlier|earlier|next|same|one|other)\s+(?:session|work period)s?\b"
        r"|\bsession's|\bsessions\b",
        "prose",
        "user",
    ),
    "signal sent to a run": (r"\bSIG(?:STOP|CONT)\b", "text", "user"),
    "commit hash": (
        r"(?i)\bcommits?\s+[0-9a-f]{7,40}\b|\bgit show [0-9a-f]{7,40}"
        r"|(?<![\w-])(?=[0-9a-f]{0,11}[a-f])(?=[0-9a-f]{0,11}\d)[0-9a-f]{7,12}(?![\w-])",
        "prose",
        "user",
    ),
    # a test function's name has several words (test_subset, test_acc are settings and metrics)
    "test name or test file": (
        r"\btests?/test_\w+\.py\b|(?<![\w.])test_[a-z0-9]+(?:_[a-z0-9]+){2,}\b",
        "prose",
        "user",
    ),
    "machine-load note": (
        r"(?i)\bload average\b|\bbusy (?:machine|CPU)\b|\bother jobs\b|\bunder (?:heavy )?load\b|\bmachine(?:'s)? load\b"
        r"|no longer on this machine|\(this one: CPU\)",
        "prose",
        "user",
    ),
    "repository path in the API reference": (r"\bdocs/[\w-]+\.md\b|\btests/test_\w+\.py\b", "text", "api"),
    # Markdown that did not render as meant
    "list items run together in a paragraph": (r"(?m)^[ \t]*[-*] +\S", "paragraphs", "all"),
    "emphasis eaten from a '*' inside a word": (
        r"[A-Za-z0-9)]<(em|strong)>|</(?:em|strong)>[A-Za-z0-9(]",
        "html",
        "all",
    ),
    "Markdown table shown as code": (r"(?m)^\|(?: *:?-{3,}:? *\|)+[ \t]*$", "code", "all"),
}


def _haystack(page: Page, where: str) -> str:
    parts = {
        "text": page.text,
        "prose": "".join(page.prose),
        "comments": "\n".join(page.comments),
        "urls": "\n".join(page.urls),
        "html": page.html,
        "code": "\n".join(page.code),
        # the text of each <p> on its own (a line break inside one is the source's)
        "paragraphs": "\n\n".join(re.sub(r"<[^>]+>", "", p) for p in re.findall(r"<p>(.*?)</p>", page.html, re.S)),
    }
    return "\n".join(parts[w] for w in where.split("+"))


def _applies(name: str, scope: str, rule: str) -> bool:
    if name == "RESULTS/index.html" and rule in RESULTS_PENDING:
        return False
    if scope == "user":
        return name not in EVIDENCE_PAGES and name not in ("404.html",)
    if scope == "api":
        return name.startswith("api/")
    return True


def text_rule_hits(rule: str, pages: dict[str, Page]) -> list[str]:
    pattern, where, scope = TEXT_RULES[rule]
    found = []
    for name, page in pages.items():
        if not _applies(name, scope, rule):
            continue
        hay = _haystack(page, where)
        for m in re.finditer(pattern, hay, re.M):
            start = max(0, m.start() - 60)
            found.append(f"{name}: ...{hay[start : m.end() + 40]!r}...")
    return found


@pytest.mark.parametrize("rule", sorted(TEXT_RULES))
def test_built_pages_show_no(built, rule):
    assert built.returncode == 0, "the site did not build (see test_site_builds_in_strict_mode)"
    found = text_rule_hits(rule, built.pages)
    assert not found, f"{rule} in the built site ({len(found)}):\n" + "\n".join(found[:30])


def test_code_tests_benchmarks_and_presets_name_no_issue_numbers():
    """Code, tests, benchmarks and the shipped presets say what they do and why, not which issue
    asked for it: the pages' "issue number" rule on every text file under src/, tests/ and
    benchmarks/ (this file's samples for the rule excepted)."""
    pattern = re.compile(TEXT_RULES["issue number"][0])
    found = []
    for top in ("src", "tests", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix not in (".py", ".sh", ".json", ".md") or path == Path(__file__).resolve():
                continue
            for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "issue numbers in the code:\n" + "\n".join(found)


def plus_bullets(markdown: str) -> list[str]:
    """Lines outside code fences that start with '+ ': Markdown makes each a stray bullet."""
    text = re.sub(r"^(```|~~~).*?^\1[ \t]*$", "", markdown, flags=re.S | re.M)
    return [line for line in text.splitlines() if re.match(r"[ \t]*\+ ", line)]


def test_no_stray_plus_bullets():
    """A wrapped line that starts with '+' (a sum continued) turns into a one-item list."""
    bad = [f"{p.name}: {line!r}" for p in sorted(DOCS.rglob("*.md")) for line in plus_bullets(p.read_text("utf-8"))]
    assert not bad, "lines starting with '+ ' (rendered as bullets):\n" + "\n".join(bad)


# The width of the content column at a 1280 px window (Material theme, navigation on the left, the
# page's contents integrated into it), measured in headless Chromium: a paragraph is 938 px wide.
CONTENT_WIDTH_PX = 938
# A figure shrunk below this fraction of its size has legends and tick labels smaller than the
# body text's size scaled by it: draw it narrower instead (about 8-9 inches at 100-120 dpi).
MIN_IMAGE_SCALE = 0.75


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, from its IHDR chunk."""
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def image_scale(natural_width: int, width_attr: str | None = None, column: int = CONTENT_WIDTH_PX) -> float:
    """The fraction of its size at which a page shows an image: max-width 100% of the column."""
    shown = natural_width
    if width_attr and width_attr.rstrip("px").isdigit():
        shown = int(width_attr.rstrip("px"))
    return min(shown, column) / natural_width


def small_images(site: Path, name: str, page: Page) -> list[str]:
    bad = []
    for img in page.images:
        src = img.get("src", "")
        if not src.endswith(".png") or "//" in src:
            continue
        path = Path(os.path.normpath((site / name).parent / src))
        scale = image_scale(png_size(path)[0], img.get("width"))
        if scale < MIN_IMAGE_SCALE:
            bad.append(f"{name}: {src} shown at {scale:.0%} ({png_size(path)[0]} px in a {CONTENT_WIDTH_PX} px column)")
    return bad


def test_figures_are_shown_near_their_size(built):
    """No figure is shrunk so far that its legend and labels become smaller than the text."""
    assert built.returncode == 0, "the site did not build"
    rule = "figure displayed below the minimum scale"
    bad = [
        b
        for name, page in built.pages.items()
        if not (name == "RESULTS/index.html" and rule in RESULTS_PENDING)
        for b in small_images(built.site, name, page)
    ]
    assert not bad, "figures displayed too small:\n" + "\n".join(bad)


def rules_cutting_cells(css: str) -> list[str]:
    """The rules of a stylesheet that keep a table cell on one line (its column is then cut off)."""
    bad = []
    for m in re.finditer(r"([^{}]+)\{([^{}]*)\}", re.sub(r"/\*.*?\*/", "", css, flags=re.S)):
        selectors, body = m.group(1), m.group(2)
        # a cell, or anything inside one (`td code` with nowrap makes a long identifier push the column out)
        if re.search(r"(?<![\w-])(td|th|tr|table)(?![\w-])", selectors) and re.search(
            r"white-space\s*:\s*(nowrap|pre)\b|text-overflow\s*:\s*ellipsis", body
        ):
            bad.append(f"{selectors.strip()[:200]} {{{body.strip()[:120]}}}")
    return bad


def test_no_stylesheet_cuts_table_cells(built):
    """No rule of any stylesheet the site ships keeps table cells on one line (columns cut off)."""
    assert built.returncode == 0, "the site did not build"
    sheets = sorted(built.site.rglob("*.css"))
    assert sheets
    bad = [
        f"{css.relative_to(built.site)}: {r}"
        for css in sheets
        for r in rules_cutting_cells(css.read_text(encoding="utf-8"))
    ]
    assert not bad, "stylesheet rules that cut table cells:\n" + "\n".join(bad)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """Each check fires on a page that has its problem (so a passing check means something)."""
    # the rule of the readthedocs theme that cut the columns
    assert rules_cutting_cells(".wy-table-responsive table td, .wy-table-responsive table th{white-space:nowrap}")
    assert rules_cutting_cells("@media screen{.md-typeset td{color:red;white-space: nowrap}}")
    assert rules_cutting_cells(".md-typeset table:not([class]) td code{white-space:nowrap}")
    assert not rules_cutting_cells(
        ".md-typeset td{white-space:normal} .md-typeset th{min-width:0} pre{white-space:pre}"
    )
    bad = {
        "reStructuredText role": "<p>see :meth:<code>first_step</code></p>",
        "reStructuredText directive": "<p>.. math::\n    x</p>",
        "raw LaTeX": "<p>density \\phi(t) = \\frac1n</p>",
        "literal-block '::' marker": "<p>Two ways to drive it::</p><pre><code>x</code></pre>",
        "doctest prompt outside a code block": "<p>&gt;&gt;&gt; import sparsam &gt;&gt;&gt; x</p>",
        "escaped table pipe": "<td><code>--opt sgd\\|sam</code></td>",
        "'# docs:' snippet marker": "<pre><code># docs: run\nimport torch</code></pre>",
        "repository-internal path": '<p>data in <a href="../shared/data/x">x</a></p>',
        "temporary or scratch path": "<p>figure: /tmp/final/fig/study_accuracy.png</p>",
        "issue number": "<p>Cheaper SAMs on one footing (issue 15): every k steps.</p>",
        "work session": "<p>The previous session's two runs gave 0.74.</p>",
        "signal sent to a run": "<p>Measured while the study runs were stopped with SIGSTOP.</p>",
        "commit hash": "<p>on the library as of commit 030a372, and 65ed3c7 before it</p>",
        "test name or test file": "<p>tested in <code>tests/test_hf.py</code> (<code>test_fisher_after_step</code>)</p>",
        "machine-load note": "<p>measured while other jobs loaded the CPU heavily (load average 4-5)</p>",
        "repository path in the API reference": "<p>Conventions are in <code>docs/masks.md</code>.</p>",
        # RESULTS' conclusions, written without the blank line a Markdown list needs
        "list items run together in a paragraph": "<p>What the study shows:\n- SAM beats SGD\n- SSAM-F beats SAM</p>",
        "emphasis eaten from a '*' inside a word": "<td>widths width<em>k, 2</em>width*k</td>",
        "Markdown table shown as code": "<pre><code>| variant | time |\n|---|---|\n| A | 0.47 |</code></pre>",
    }
    assert bad.keys() == TEXT_RULES.keys()
    for rule, html in bad.items():
        scope = TEXT_RULES[rule][2]
        name = {"user": "guide/index.html", "api": "api/masks/index.html"}.get(scope, "guide/index.html")
        assert text_rule_hits(rule, {name: Page.parse(html)}), rule
        if scope == "user":  # the evidence pages may say it
            assert not text_rule_hits(rule, {"validation/index.html": Page.parse(html)}), rule
        if scope == "api":
            assert not text_rule_hits(rule, {"masks/index.html": Page.parse(html)}), rule
    source = (
        '<details class="mkdocstrings-source"><pre><code>xlabel=r"$\\alpha$"  # tests/test_x.py</code></pre></details>'
    )
    for rule in TEXT_RULES:  # an API entry's source listing is code, not text for the reader
        assert not text_rule_hits(rule, {"api/masks/index.html": Page.parse(source)}), rule
    good = (
        "<p>ρ‖g‖₂ with <code>T = |w| + eta</code>; see <a href='api/'>API</a>, <em>flat</em> minima and"
        " <strong>SAM</strong>; widths <code>width*k</code>, a load of 1e-12, MD5 c58f30108f718f92721af3b95e74349a,"
        " a training session ends; SIGTERM stops a run; the test set, test_acc, test_subset; weight decay 5e-4 -"
        " 1e-3.</p><ul><li>- not a run</li></ul><pre><code>a[::2]\ndef test_accuracy(model): ...\n"
        "| not | a table |</code></pre><p>x\n+ y</p>"
    )
    for rule in TEXT_RULES:
        for name in ("guide/index.html", "api/masks/index.html"):
            assert not text_rule_hits(rule, {name: Page.parse(good)}), (rule, name)
    # a wrapped line that starts with '+' becomes a bullet; inside a code block it does not
    assert plus_bullets("A's peak is 64 × 2.8 MB\n  + activations ≈ 0.5 GB") == ["  + activations ≈ 0.5 GB"]
    assert plus_bullets("```text\n+ 1\n```\nx + y\n") == []
    # API entries: signatures, duplicates, split Returns
    head = '<h3 id="m.{0}" class="doc doc-heading"><code class="doc-symbol doc-symbol-class"></code>{0}</h3>\n'
    sig = '<div class="language-python doc-signature highlight"><pre><span></span><code>{}</code></pre></div>'
    page = (
        head.format("A") + sig.format("A(x: int)") + head.format("B") + sig.format("B") + head.format("C") + "<p>C</p>"
    )
    assert api_entries(page) == {"m.A": ("class", True), "m.B": ("class", False), "m.C": ("class", False)}
    assert duplicate_api_entries({"api/a/index.html": page, "api/b/index.html": head.format("A")}) == [
        "m.A: api/a/index.html, api/b/index.html"
    ]
    assert duplicate_api_entries({"api/a/index.html": page + head.format("C")}) == ["m.C: api/a/index.html (2x)"]
    assert not duplicate_api_entries({"api/a/index.html": page, "api/b/index.html": head.format("D")})
    item = (
        '<li class="doc-section-item field-body"><code>{}</code> – <div class="doc-md-description"><p>{}</p></div></li>'
    )
    returns = '<p><span class="doc-section-title">Returns:</span></p>\n<ul>\n{}</ul>'
    split = returns.format(item.format("Tensor", "the mask") + item.format("int", "kept coordinates: how many"))
    whole = returns.format(item.format("Tensor", "the mask, and how many coordinates it keeps"))
    assert split_returns(split) == [2] and split_returns(whole) == []
    # figures: a 1690 px figure in the 938 px column is shown at 55%
    assert image_scale(1690) < MIN_IMAGE_SCALE <= image_scale(880) == 1.0
    assert image_scale(1690, "900") < MIN_IMAGE_SCALE
    png = tmp_path / "site" / "figures" / "wide.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + (1690).to_bytes(4, "big") + (572).to_bytes(4, "big"))
    img = Page.parse('<p><img alt="x" src="../figures/wide.png"></p>')
    assert small_images(tmp_path / "site", "results/index.html", img)
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + (880).to_bytes(4, "big") + (374).to_bytes(4, "big"))
    assert not small_images(tmp_path / "site", "results/index.html", img)
    # TrainConfig's fields: a list that lost one fails
    assert missing_fields("<li><code>data</code> (<code>--data</code>)</li>", ["data", "lr"]) == ["lr"]
    assert missing_fields("<li><code>data</code></li><li><code>lr</code> (...)</li>", ["data", "lr"]) == []


def test_site_loads_nothing_from_the_network(built):
    """Scripts, stylesheets, fonts and images are the site's own: it works offline."""
    assert built.returncode == 0, "the site did not build"
    bad = []
    for name, path in ((n, built.site / n) for n in built.pages):
        html = path.read_text(encoding="utf-8")
        for tag in re.findall(r"<(?:script|link|img|source|iframe)\b[^>]*>", html):
            if re.search(r"""(?:src|href)=["']?(?:https?:)?//""", tag):
                bad.append(f"{name}: {tag[:160]}")
    for css in built.site.rglob("*.css"):
        bad += [
            f"{css.name}: {u}"
            for u in re.findall(r"url\(\s*['\"]?(?:https?:)?//[^)]*\)", css.read_text(encoding="utf-8"))
        ]
        bad += [
            f"{css.name}: @import {u}"
            for u in re.findall(r"@import\s+(?:url\()?['\"]?(?:https?:)?//[^;]*", css.read_text(encoding="utf-8"))
        ]
    assert not bad, "assets loaded from the network:\n" + "\n".join(bad[:30])


HEADING = re.compile(r'<h(?P<level>\d) id="(?P<id>[^"]+)" class="doc doc-heading">(?P<body>.*?)</h(?P=level)>\s*', re.S)


def api_entries(html: str) -> dict[str, tuple[str, bool]]:
    """id -> (kind, has a signature) for every object documented on the API page."""
    entries = {}
    for m in HEADING.finditer(html):
        kind = re.search(r"doc-symbol-(class|function|method|attribute|module)\b", m.group("body"))
        after = html[m.end() : m.end() + 20000]
        sig = re.match(r'<div class="[^"]*\bdoc-signature\b[^"]*"><pre><span></span><code>(.*?)</code>', after, re.S)
        text = re.sub(r"<[^>]+>", "", sig.group(1)) if sig else ""
        # a signature, not just the name: parameters in parentheses (an attribute shows its type)
        signed = bool(sig) and ("(" in text or (kind is not None and kind.group(1) == "attribute"))
        entries[m.group("id")] = (kind.group(1) if kind else "?", signed)
    return entries


def api_pages(built: Built) -> dict[str, str]:
    """name -> HTML of every page of the API reference (one per area)."""
    return {name: page.html for name, page in built.pages.items() if name.startswith("api/")}


def duplicate_api_entries(pages: dict[str, str]) -> list[str]:
    """Objects documented more than once across the API reference (the second copy's anchors clash)."""
    where: dict[str, list[str]] = {}
    for name, html in sorted(pages.items()):
        for m in HEADING.finditer(html):
            where.setdefault(m.group("id"), []).append(name)
    out = []
    for ident, names in sorted(where.items()):
        if len(names) > 1:
            out.append(
                f"{ident}: {names[0]} ({len(names)}x)" if len(set(names)) == 1 else f"{ident}: {', '.join(names)}"
            )
    return out


def split_returns(html: str) -> list[int]:
    """The item counts of "Returns" sections cut into several items (a description whose lines read
    like "name: text" is split by the Google-style parser unless it is told not to)."""
    counts = []
    for m in re.finditer(r'doc-section-title">Returns:</span></p>\s*<ul>(.*?)</ul>', html, re.S):
        n = m.group(1).count('<li class="doc-section-item')
        if n > 1:
            counts.append(n)
    return counts


def missing_fields(html: str, names: list[str]) -> list[str]:
    """The names that no list item of ``html`` opens with, as code."""
    shown = set(re.findall(r"<li><code>(\w+)</code>", html))
    return [n for n in names if n not in shown]


def is_exception(html: str, ident: str) -> bool:
    """An exception class (raised by the library, not built by the user) needs no constructor signature."""
    start = html.index(f'id="{ident}"')
    bases = re.search(r"Bases:(.*?)</p>", html[start : start + 3000], re.S)
    return bool(bases and re.search(r"(Error|Exception|Warning)\b", re.sub(r"<[^>]+>", "", bases.group(1))))


def public_names(module: str) -> list[str] | None:
    """The module's `__all__`, read from its source (no import: optional dependencies stay optional)."""
    base = SRC / Path(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    if not path.exists():
        return None
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(getattr(t, "id", None) == "__all__" for t in targets):
            return [n for n in ast.literal_eval(node.value) if not n.startswith("__")]
    raise AssertionError(f"{module} has no __all__: the API reference cannot know its public names")


# Shown without a signature on purpose, and why.
NO_SIGNATURE = {
    "sparsam.train.TrainConfig": "built by build_config(); its ~60 fields are the flags of the Training page",
}


def test_api_reference_entries_have_signatures(built):
    assert built.returncode == 0, "the site did not build"
    html = "\n".join(api_pages(built).values())
    entries = api_entries(html)
    assert len(entries) > 50, f"the API reference documents only {len(entries)} objects"
    unsigned = [
        i
        for i, (kind, signed) in entries.items()
        if kind in ("class", "function", "method")
        and not signed
        and not is_exception(html, i)
        and i not in NO_SIGNATURE
    ]
    assert not unsigned, f"API reference entries without a signature: {unsigned}"


def test_api_reference_is_one_page_per_area(built):
    assert built.returncode == 0, "the site did not build"
    areas = {f"api/{a}/index.html" for a in ("optimizers", "masks", "variants", "training", "analysis", "integrations")}
    assert areas <= api_pages(built).keys()
    empty = [a for a in sorted(areas) if not HEADING.search(built.pages[a].html)]
    assert not empty, f"API pages that document nothing: {empty}"


def test_api_reference_documents_each_object_once(built):
    assert built.returncode == 0, "the site did not build"
    dup = duplicate_api_entries(api_pages(built))
    assert not dup, "objects documented twice (their anchors clash):\n" + "\n".join(dup)


def test_api_returns_sections_are_whole(built):
    assert built.returncode == 0, "the site did not build"
    bad = [f"{name}: {n} items" for name, html in api_pages(built).items() for n in split_returns(html)]
    assert not bad, "Returns sections split into fragments:\n" + "\n".join(bad)


def test_api_reference_links_to_the_source(built):
    """Every documented class and function shows its source (mkdocstrings show_source)."""
    assert built.returncode == 0, "the site did not build"
    html = built.pages["api/optimizers/index.html"].html
    assert "Source code in" in html and "sparsam/optim/sam.py" in html


def test_api_reference_lists_every_trainconfig_field(built):
    import dataclasses

    from sparsam.train import TrainConfig

    assert built.returncode == 0, "the site did not build"
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    missing = missing_fields(built.pages["api/training/index.html"].html, names)
    assert not missing, f"TrainConfig fields missing from the API reference: {missing}"


def test_api_reference_shows_every_public_name(built):
    assert built.returncode == 0, "the site did not build"
    entries = api_entries("\n".join(api_pages(built).values()))
    missing = []
    for module in PUBLIC_MODULES:
        names = public_names(module)
        if names is None:
            continue
        for name in names:
            if (SRC / Path(*module.split("."), name)).is_dir() or (
                SRC / Path(*module.split("."), f"{name}.py")
            ).exists():
                continue  # a submodule: its names are checked as a module of its own
            # Documented where it lives or where a parent package re-exports it (sparsam.optim.SAM as sparsam.SAM),
            # or, for a name a package re-exports (sparsam.MSAM), in the package's module that defines it.
            parts = module.split(".")
            candidates = {".".join(parts[:k] + [name]) for k in range(1, len(parts) + 1)}
            inside = [i for i in entries if i.startswith(module + ".") and i.endswith("." + name)]
            if not candidates & entries.keys() and not inside:
                missing.append(f"{module}.{name}")
    assert not missing, f"public names missing from the API reference (docs/api/*.md): {missing}"


# ---------------------------------------------------------------------------------------------------
# What a new user looks for first


def test_home_page_has_install_version_repository_and_citation():
    import sparsam

    home = (DOCS / "index.md").read_text(encoding="utf-8")
    install = home.split("## Install", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert "pip install torch" in install and "pip install" in install.split("pip install torch", 1)[1]
    assert f"sparsam {sparsam.__version__}" in home, "the home page states another version"
    cff = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert re.search(rf"^version: {re.escape(sparsam.__version__)}$", cff, re.M), "CITATION.cff states another version"
    repo = re.search(r"^repo_url: (\S+)$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.M)
    assert repo and repo.group(1) in home and f"repository-code: {repo.group(1)}" in cff
    where = home.split("## Where to go", 1)[1]
    for target in ("tutorial.md", "choosing.md", "choosing.md#sam-didnt-help-or-diverged-a-checklist", "api/index.md"):
        assert f"({target})" in where, f"the home page's 'Where to go' table does not link {target}"


def test_navigation_is_grouped():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:\n", 1)[1]
    groups = re.findall(r"^  - ([^:\n]+):\s*$", nav, re.M)
    assert groups == ["Get started", "Guides", "Reference", "Evidence", "Project"], groups


def train_flags() -> set[str]:
    from sparsam.cli.train import build_parser

    return {opt for action in build_parser("sparsam train")._actions for opt in action.option_strings}


# `sparsam sweep`'s own flags, which the tutorial uses beside those of `sparsam train`
SWEEP_FLAGS = {"--root", "--methods", "--seeds", "--sparsities"}


def unknown_flags(text: str, known: set[str]) -> list[str]:
    return sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", text)) - known)


def test_guides_name_only_flags_that_exist():
    """Every `--flag` the choosing guide and the tutorial tell a user to pass exists in `sparsam train`."""
    known = train_flags() | SWEEP_FLAGS
    assert "--rho" in known and not unknown_flags("--rho 0.1 --weight-decay 1e-3", known)
    assert unknown_flags("lower --rho, or --rho-warmup 0.1", known) == ["--rho-warmup"]  # a flag that does not exist
    for name in ("choosing.md", "tutorial.md"):
        unknown = unknown_flags((DOCS / name).read_text(encoding="utf-8"), known)
        assert not unknown, f"{name} names flags that sparsam train does not have: {unknown}"
