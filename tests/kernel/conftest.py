from __future__ import annotations

from pathlib import Path

import pytest

from tenfold.settings import Settings
from tests.backends import SqliteTemplate
from tests.conftest import make_settings


@pytest.fixture
def embedded(tmp_path: Path, sqlite_template: SqliteTemplate) -> Settings:
    """Settings of the embedded stack (a migrated SQLite clone, memory KV) in a fresh data dir."""
    url = sqlite_template.clone(tmp_path / "db" / "tenfold.db")
    return make_settings(data_dir=str(tmp_path / "data"), database_url=url, redis_url="")
