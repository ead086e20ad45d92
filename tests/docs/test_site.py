"""The documentation site builds in strict mode, without a warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.process import REPO_ROOT

pytestmark = pytest.mark.unit

pytest.importorskip("mkdocs", reason="mkdocs is not installed; install the docs extra: pip install -e '.[docs]'")
pytest.importorskip("material", reason="mkdocs-material is not installed; install the docs extra")


def test_site_builds_strict(tmp_path: Path) -> None:
    environment = dict(os.environ)
    # Material 9.7 and later print a notice about its end of life on every build.
    environment["NO_MKDOCS_2_WARNING"] = "1"

    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()


def test_nav_lists_every_page() -> None:
    nav = (REPO_ROOT / "mkdocs.yml").read_text()
    pages = sorted(path.relative_to(REPO_ROOT / "docs").as_posix() for path in (REPO_ROOT / "docs").rglob("*.md"))

    missing = [page for page in pages if page not in nav]

    assert missing == [], f"pages missing from the nav of mkdocs.yml: {missing}"
