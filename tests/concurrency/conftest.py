"""The integration suite's database fixtures, shared with these tests."""

from tests.integration.conftest import app_database, rows

__all__ = ["app_database", "rows"]
