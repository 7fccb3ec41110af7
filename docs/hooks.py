"""MkDocs hooks of the documentation site (mkdocs.yml, ``hooks:``).

* ``<!-- trainconfig-fields -->`` on a page becomes the list of every `TrainConfig` field (name, flag,
  default, help), read from the dataclass at build time, so the reference never falls behind the code.
* In the API reference, a docstring's mention of a guide page by its file name (``docs/masks.md``)
  becomes a link to that page, so the rendered reference shows no repository paths.
"""

from __future__ import annotations

import dataclasses
import html
import re
from typing import Any

from mkdocs.utils import get_relative_url

PLACEHOLDER = "<!-- trainconfig-fields -->"
GUIDE_PATH = re.compile(r"(?:<code>)?docs/(?P<name>[a-z_]+)\.md(?:</code>)?")


def _cell(text: str) -> str:
    """Text for Markdown: no pipes, stars or underscores that Markdown would act on."""
    return html.escape(text).replace("|", "&#124;").replace("*", "&#42;").replace("_", "&#95;")


def trainconfig_table() -> str:
    """Every field of `TrainConfig`, grouped as `sparsam train --help` groups them: one list item per
    field with its flag, its default and its help (a list reads better than a four-column table
    whose narrow columns break identifiers)."""
    from sparsam.train.config import FIELDS

    groups: dict[str, list[str]] = {}
    for f in FIELDS.values():
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        choices = f.metadata.get("choices")
        help_text = f.metadata.get("help", "")
        if choices:
            help_text += f" (one of: {', '.join(choices)})"
        flag = f.name.replace("_", "-")
        groups.setdefault(f.metadata.get("group", "other"), []).append(
            f"- `{f.name}` (`--{flag}`, default `{default!r}`): {_cell(help_text)}"
        )
    return "\n\n".join(f"**{group}**\n\n" + "\n".join(items) for group, items in groups.items())


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if PLACEHOLDER in markdown:
        markdown = markdown.replace(PLACEHOLDER, trainconfig_table())
    return markdown


def on_page_content(content: str, page: Any, config: Any, files: Any) -> str:
    if not page.file.src_uri.startswith("api/"):
        return content
    pages = {f.src_uri: f for f in files.documentation_pages()}

    def link(m: re.Match[str]) -> str:
        name = m.group("name")
        target = pages.get(f"{name}.md")
        if target is None:
            return m.group(0)
        title = name.replace("_", " ")
        return f'the <a href="{get_relative_url(target.url, page.url)}">{title}</a> page'

    return GUIDE_PATH.sub(link, content)
