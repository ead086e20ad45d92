"""MkDocs hooks of the documentation site, registered in mkdocs.yml.

Pages link to files outside docs/ with relative paths (``../examples/leads/README.md``),
which work on the repository's web view but are not part of the site. These hooks rewrite
such links to the file in the repository at `repo_url`, so the site has no broken links.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

# An inline Markdown link or image target: ](target) or ](target "title").
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")
_BRANCH = "main"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Point relative links that leave docs/ at the repository's copy of the file."""
    repo_url = str(config.get("repo_url") or "").rstrip("/")
    if not repo_url:
        return markdown
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match[str]) -> str:
        target = match.group("target")
        if "://" in target or target.startswith(("#", "/", "mailto:")):
            return match.group(0)
        path, _, anchor = target.partition("#")
        resolved = posixpath.normpath(posixpath.join("docs", page_dir, path))
        if resolved.startswith("docs/") or resolved.startswith(".."):
            return match.group(0)
        kind = "tree" if path.endswith("/") else "blob"
        url = f"{repo_url}/{kind}/{_BRANCH}/{resolved}" + (f"#{anchor}" if anchor else "")
        return f"]({url}{match.group('title') or ''})"

    return _LINK.sub(rewrite, markdown)
