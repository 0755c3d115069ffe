"""Every config shipped in configs/ loads, and its datasets resolve and read — so examples never rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.data.datasets import load_many

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_repo_has_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_its_data_reads(path, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name paths relative to the repo root, as the README runs them
    config = load_config(path)
    conversations, counts = load_many(config.data.train, config.data.dataset_dir)
    assert len(conversations) == sum(counts.values()) > 0
