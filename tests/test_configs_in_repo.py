"""Every config shipped in configs/ loads, and its datasets resolve and read — so examples never rot. Export configs
(LLaMA-Factory export YAML) read as export requests and name a run that a training config here produces."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmforge.config import load_config
from lmforge.config.llamafactory import is_export_yaml
from lmforge.export.pipeline import request_from_yaml
from lmforge.train.stages import read_stage_data

REPO = Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
EXPORT_CONFIGS = [p for p in ALL_CONFIGS if is_export_yaml(yaml.safe_load(p.read_text(encoding="utf-8")) or {})]
CONFIGS = [p for p in ALL_CONFIGS if p not in EXPORT_CONFIGS]


def test_repo_has_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_its_data_reads(path, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name paths relative to the repo root, as the README runs them
    config = load_config(path)
    records, counts = read_stage_data(config)  # conversations, pairs, labelled replies or documents, per stage
    assert len(records) == sum(counts.values()) > 0


@pytest.mark.parametrize("path", EXPORT_CONFIGS, ids=lambda p: p.name)
def test_export_config_reads_and_names_a_trained_run(path, monkeypatch):
    monkeypatch.chdir(REPO)
    request = request_from_yaml(path)
    assert request.output and request.base_model
    assert request.adapter in {str(load_config(p).output_dir) for p in CONFIGS}
