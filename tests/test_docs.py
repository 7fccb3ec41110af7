"""The documentation: every snippet runs, the site builds in strict mode, and the built pages show a
reader nothing they should not see.

Snippets: every fenced block opened by ```` ```python ```` in docs/*.md and README.md runs. The blocks
of one page run in order, in one fresh namespace, in a temporary working directory. A block that
must not run (it downloads a data set, needs a GPU, shows a signature) is opened with
```` ```python {.no-run} ```` instead, which renders the same. A block that imports a package that
is not installed (`transformers`, say) is skipped, and the page's test reports the skip.

The built site is checked page by page for what a reader should never see: reStructuredText roles
and directives, raw LaTeX, literal-block ``::`` markers, doctest prompts in prose, snippet markers,
repository-internal paths, escaped table pipes, a stylesheet rule that cuts table cells, and an API
reference entry without its signature or a public name missing from it.
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
    assert "api/index.html" in built.pages


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
        self._pre = 0
        self._code = 0
        self._hidden = 0  # <script>, <style>, <template>

    @classmethod
    def parse(cls, html: str) -> Page:
        page = cls()
        page.feed(html)
        page.close()
        return page

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "template"):
            self._hidden += 1
        elif tag == "pre":
            self._pre += 1
            self.code.append("")
        elif tag == "code":
            self._code += 1
        if tag in BLOCK_TAGS:
            self.prose.append("\n")
        self.urls += [v for k, v in attrs if k in ("href", "src") and v]

    def handle_endtag(self, tag):
        if tag in ("script", "style", "template"):
            self._hidden = max(0, self._hidden - 1)
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

# name -> (what the reader sees, pattern, where to look)
TEXT_RULES = {
    "reStructuredText role": (
        r"(?<![\w:]):(?:py:)?(?:meth|class|func|math|attr|mod|obj|exc|data|ref|const|term|doc|cite):(?=\S)",
        "text",
    ),
    "reStructuredText directive": (r"(?:^|\s)\.\. [a-z][\w-]*::", "text"),
    "raw LaTeX": (r"\\(?:" + "|".join(LATEX_COMMANDS) + r")(?![A-Za-z])|\$\$|(?<!\\)\\[()\[\]](?=\s*[\w\\])", "text"),
    "literal-block '::' marker": (r"[^\s:]::[ \t]*\n", "prose"),
    "doctest prompt outside a code block": (r">>>", "prose"),
    "escaped table pipe": (r"\\\|", "text"),
    "'# docs:' snippet marker": (r"#\s*docs\s*:", "text+comments"),
    "repository-internal path": (r"\.\./shared|shared/data|/work/|/tmp/team|/tmp/bash_jobs", "text+comments+urls"),
}


def _haystack(page: Page, where: str) -> str:
    parts = {
        "text": page.text,
        "prose": "".join(page.prose),
        "comments": "\n".join(page.comments),
        "urls": "\n".join(page.urls),
    }
    return "\n".join(parts[w] for w in where.split("+"))


@pytest.mark.parametrize("rule", sorted(TEXT_RULES))
def test_built_pages_show_no(built, rule):
    assert built.returncode == 0, "the site did not build (see test_site_builds_in_strict_mode)"
    pattern, where = TEXT_RULES[rule]
    found = []
    for name, page in built.pages.items():
        hay = _haystack(page, where)
        for m in re.finditer(pattern, hay, re.M):
            start = max(0, m.start() - 60)
            found.append(f"{name}: ...{hay[start : m.end() + 40]!r}...")
    assert not found, f"{rule} in the built site ({len(found)}):\n" + "\n".join(found[:30])


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


def test_the_checks_catch_what_they_are_for():
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
    }
    assert bad.keys() == TEXT_RULES.keys()
    for rule, html in bad.items():
        pattern, where = TEXT_RULES[rule]
        assert re.search(pattern, _haystack(Page.parse(html), where), re.M), rule
    head = '<h3 id="m.{0}" class="doc doc-heading"><code class="doc-symbol doc-symbol-class"></code>{0}</h3>\n'
    sig = '<div class="language-python doc-signature highlight"><pre><span></span><code>{}</code></pre></div>'
    page = (
        head.format("A") + sig.format("A(x: int)") + head.format("B") + sig.format("B") + head.format("C") + "<p>C</p>"
    )
    assert api_entries(page) == {"m.A": ("class", True), "m.B": ("class", False), "m.C": ("class", False)}
    good = "<p>ρ‖g‖₂ with <code>T = |w| + eta</code>; see <a href='api/'>API</a>.</p><pre><code>a[::2]</code></pre>"
    for rule, (pattern, where) in TEXT_RULES.items():
        assert not re.search(pattern, _haystack(Page.parse(good), where), re.M), rule


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
    html = (built.site / "api" / "index.html").read_text(encoding="utf-8")
    entries = api_entries(html)
    assert len(entries) > 50, f"the API page documents only {len(entries)} objects"
    unsigned = [
        i
        for i, (kind, signed) in entries.items()
        if kind in ("class", "function", "method")
        and not signed
        and not is_exception(html, i)
        and i not in NO_SIGNATURE
    ]
    assert not unsigned, f"API reference entries without a signature: {unsigned}"


def test_api_reference_shows_every_public_name(built):
    assert built.returncode == 0, "the site did not build"
    entries = api_entries((built.site / "api" / "index.html").read_text(encoding="utf-8"))
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
            # Documented where it lives or where a parent package re-exports it (sparsam.optim.SAM as sparsam.SAM).
            parts = module.split(".")
            candidates = {".".join(parts[:k] + [name]) for k in range(1, len(parts) + 1)}
            if not candidates & entries.keys():
                missing.append(f"{module}.{name}")
    assert not missing, f"public names missing from the API reference (docs/api.md): {missing}"
