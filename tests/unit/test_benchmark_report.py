"""The generated section of the benchmarks page: replaced between its markers, rejected without them."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import report

pytestmark = pytest.mark.unit

RESULTS = {
    "date": "2026-01-01T00:00:00+00:00",
    "command": "python -m benchmarks.run --scenarios memory ",
    "machine": {"cpus": 2},
    "memory": {
        "backlog/10": {
            "messages": 10,
            "peak_rss_mib": 50.0,
            "median_rate": 100,
            "all_finished": True,
            "runs": [{"peak_rss_mib": 50.0}],
        }
    },
}


def test_update_docs_replaces_only_generated_section(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# Title\n\nprose\n\n{report.START_MARKER}\nold table\n{report.END_MARKER}\n\n## After\n")

    report.update_docs(RESULTS, tmp_path / "run.json", page)

    text = page.read_text()
    assert text.startswith("# Title\n\nprose\n\n")
    assert text.endswith(f"{report.END_MARKER}\n\n## After\n")
    assert "old table" not in text
    assert "| cpus | 2 |" in text
    assert "Command: `python -m benchmarks.run --scenarios memory`" in text
    assert "| 10 | 50.0 | 50.0 | 100 | yes |" in text


def test_update_docs_without_markers_rejected(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text("# Title\n")

    with pytest.raises(SystemExit, match="add the two lines"):
        report.update_docs(RESULTS, tmp_path / "run.json", page)
    assert page.read_text() == "# Title\n"
