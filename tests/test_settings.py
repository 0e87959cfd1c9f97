"""Settings are documented, and unset stores mean embedded mode."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

from tether.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_settings_table_in_docs_is_current() -> None:
    path = str(ROOT / "scripts/document-settings")
    loader = importlib.machinery.SourceFileLoader("document_settings", path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    doc = (ROOT / "docs/configuration.md").read_text()
    assert module.render(doc) == doc, "run scripts/document-settings"


def test_unset_database_and_redis_mean_embedded(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url="", redis_url="")
    assert settings.embedded
    assert settings.effective_database_url.startswith("sqlite+aiosqlite:///")
