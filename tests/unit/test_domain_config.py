"""simserver.domain_config: the shipped domains/*.yaml load, and broken files fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest

from simserver.domain_config import DomainConfig, Limits, load_domain, load_domains
from simserver.metrics import METRICS
from tests.unit.conftest import ROOT

SHIPPED = {"fashion", "food", "almonds-suppliers"}


@pytest.fixture(scope="module")
def shipped() -> dict[str, DomainConfig]:
    return load_domains(ROOT / "domains")


def test_shipped_domains_load(shipped):
    assert SHIPPED <= set(shipped)
    assert list(shipped) == sorted(shipped)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_domain_fields_are_valid(shipped, name):
    cfg = shipped[name]
    assert cfg.name == name
    assert cfg.metric in METRICS
    assert 1 <= cfg.top_k <= 100
    assert cfg.encoder
    demo = cfg.demo_path()
    assert demo is not None and demo.is_absolute() and demo.is_dir()
    categories = {p.name for p in demo.iterdir() if p.is_dir()}
    assert len(categories) >= 2
    if cfg.target_label is not None:
        assert cfg.target_label in categories  # the target class must exist in the demo data
    lim = cfg.limits
    assert min(lim.max_upload_bytes, lim.max_entries, lim.max_uncompressed_bytes, lim.max_image_pixels) >= 1


def test_almonds_target_label(shipped):
    assert shipped["almonds-suppliers"].target_label == "peanuts"


def write(folder: Path, stem: str, text: str) -> Path:
    path = folder / f"{stem}.yaml"
    path.write_text(text)
    return path


def test_minimal_file_gets_defaults(tmp_path):
    cfg = load_domain(write(tmp_path, "shop", ""))
    assert cfg.name == "shop"
    assert (cfg.metric, cfg.top_k, cfg.encoder, cfg.demo_data) == ("cosine", 5, "builtin", None)
    assert cfg.demo_path() is None
    assert cfg.limits == Limits()


def test_relative_and_absolute_demo_paths(tmp_path):
    rel = load_domain(write(tmp_path, "a", "demo_data: demo/fashion\n"))
    assert rel.demo_path() == ROOT / "demo" / "fashion"
    absolute = load_domain(write(tmp_path, "b", f"demo_data: {tmp_path}\n"))
    assert absolute.demo_path() == tmp_path


def test_config_is_frozen(tmp_path):
    cfg = load_domain(write(tmp_path, "shop", "metric: l2\n"))
    with pytest.raises(ValueError):
        cfg.metric = "l1"


@pytest.mark.parametrize("metric", METRICS)
def test_every_metric_is_accepted(tmp_path, metric):
    assert load_domain(write(tmp_path, "shop", f"metric: {metric}\n")).metric == metric


@pytest.mark.parametrize(
    "stem, text, words",
    [
        ("shop", "metric: hamming\n", "metric"),
        ("shop", "top_k: 0\n", "top_k"),
        ("shop", "top_k: 1000\n", "top_k"),
        ("shop", "colour: red\n", "colour"),  # unknown key
        ("shop", "limits:\n  max_entries: 0\n", "max_entries"),
        ("shop", "limits:\n  max_files: 10\n", "max_files"),  # unknown limit
        ("shop", "name: other\n", "must match the file name"),
        ("shop", "relevance:\n  site_rule: vote\n", "site_rule"),
        ("shop", "relevance:\n  relevant_share: 0.1\n  irrelevant_share: 0.1\n", "irrelevant_share"),
        ("shop", "relevance:\n  folds: 0\n", "folds"),
        ("Shop", "", "lower-case"),  # name from the file: upper case
        ("shop_1", "", "lower-case"),
        ("-shop", "", "lower-case"),
        ("a" * 64, "", "lower-case"),
        ("ui", "", "reserved"),  # the web interface's mount
    ],
    ids=[
        "metric",
        "top_k-0",
        "top_k-big",
        "unknown-key",
        "limit-0",
        "unknown-limit",
        "name-mismatch",
        "site-rule",
        "shares",
        "folds",
        "upper",
        "underscore",
        "leading-dash",
        "too-long",
        "reserved",
    ],
)
def test_invalid_files_are_refused(tmp_path, stem, text, words):
    path = write(tmp_path, stem, text)
    with pytest.raises(ValueError, match=words):
        load_domain(path)
    with pytest.raises(ValueError):
        load_domains(tmp_path)  # one broken file fails the whole start-up


def test_longest_valid_name(tmp_path):
    assert load_domain(write(tmp_path, "a" * 63, "")).name == "a" * 63
