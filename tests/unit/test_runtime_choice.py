"""The float32 / int8 decision (simserver.runtime_choice) on real retrieval results, and the
training step around it with a backend whose "int8" runtime really quantizes the vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simserver.domain_config import DomainConfig
from simserver.evaluation import evaluate_retrieval
from simserver.ingest import read_zip
from simserver.runtime_choice import choose, hit_flips
from tests.unit.conftest import fake_encode, make_zip, solid

RNG = np.random.default_rng(0)


def clusters(n_classes: int = 6, per: int = 12, spread: float = 0.3, dim: int = 16):
    centres = RNG.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per).astype(str)
    x = centres[labels.astype(int)] + spread * RNG.normal(size=(len(labels), dim))
    return x.astype(np.float32), labels


def result(x, labels, q):
    g = ~q
    return evaluate_retrieval(x[q], labels[q], x[g], labels[g])


def test_identical_vectors_choose_int8_with_a_zero_interval():
    x, labels = clusters()
    q = np.arange(len(labels)) % 4 == 0
    d = choose(result(x, labels, q), result(x.copy(), labels, q), 0.01)
    assert d.runtime == "int8" and d.recall_at_1_loss == 0 and d.recall_at_1_loss_ci == (0.0, 0.0)
    assert d.map_at_r_loss == 0 and "within 0.010" in d.reason


def test_a_lossy_runtime_is_refused_and_the_loss_is_the_paired_difference():
    x, labels = clusters(spread=0.6)
    q = np.arange(len(labels)) % 4 == 0
    noisy = x + 1.5 * RNG.normal(size=x.shape).astype(np.float32)  # much worse than int8 would be
    f, i = result(x, labels, q), result(noisy, labels, q)
    d = choose(f, i, 0.01)
    worse, better = hit_flips(f, i)
    assert d.runtime == "float32" and "interval reaches above" in d.reason
    assert d.recall_at_1_loss == pytest.approx((worse - better) / f.queries)
    assert d.recall_at_1_loss == pytest.approx(f.recall_at_1 - i.recall_at_1)
    lo, hi = d.recall_at_1_loss_ci
    assert lo <= d.recall_at_1_loss <= hi and hi > 0.01


def test_a_loss_within_a_generous_limit_is_accepted():
    x, labels = clusters(spread=0.6)
    q = np.arange(len(labels)) % 4 == 0
    noisy = x + 1.5 * RNG.normal(size=x.shape).astype(np.float32)
    f, i = result(x, labels, q), result(noisy, labels, q)
    assert choose(f, i, 1.0).runtime == "int8"  # every loss is within 100 points


WARM = [(250, 40, 30), (240, 90, 20), (230, 60, 60), (250, 120, 10), (220, 30, 80)]
COOL = [(30, 60, 240), (20, 140, 230), (60, 90, 200), (10, 200, 220), (70, 40, 250)]


class QuantizingBackend:
    """fake_encode as float32; its "int8" runtime rounds the same vectors to ``levels`` steps
    (what int8 does to activations), so a coarse grid really changes the ranking."""

    encoder, encoder_id = "fake", "fake:1"

    def __init__(self, levels: float) -> None:
        self.levels = levels
        self.calls: list[str] = []

    def encode(self, images):
        return fake_encode(images)

    def encode_with(self, images, encoder):
        self.calls.append(encoder)
        v = fake_encode(images)
        if encoder.startswith("int8:"):
            v = np.round(v * self.levels) / self.levels + 1e-3
        return v

    def train_head(self, *args):
        raise AssertionError("pretrained trainings fit no head")

    def export(self, *args):
        raise AssertionError("pretrained trainings export nothing")


def _dataset():
    entries = {f"warm/{i}.png": solid(c) for i, c in enumerate(WARM)}
    entries.update({f"cool/{i}.png": solid(c) for i, c in enumerate(COOL)})
    from simserver.domain_config import Limits

    return read_zip(make_zip(entries), Limits())


@pytest.mark.parametrize("levels", [1e6, 0.01])
def test_training_serves_int8_only_within_the_limit_and_never_mixes(repo, levels):
    from simserver.training import train_domain

    be = QuantizingBackend(levels)
    report = train_domain(repo, DomainConfig(name="shop"), _dataset(), be, mode="pretrained")
    rt = report.meta["runtime"]
    meta = json.loads(repo.store.get(f"domains/shop/versions/{report.version}/meta.json"))
    assert meta["runtime"] == rt == report.as_json()["runtime"]
    assert rt["float32"]["queries"] == rt["int8"]["queries"] == 2 and set(rt["img_per_s"]) == {
        "float32",
        "int8",
    }
    items, vectors = repo.load("shop", report.version).live()
    samples = {s.name: s for s in _dataset().samples}
    images = np.stack([samples[it.name].pixels for it in items])
    if rt["runtime"] == "int8":
        assert levels == 1e6 and meta["encoder"] == "int8:fake" and meta["encoder_id"] == "fake:1+int8"
        expected = be.encode_with(images, "int8:fake")
    else:
        assert levels == 0.01 and meta["encoder"] == "fake" and rt["recall_at_1_loss_ci"][1] > 0.01
        expected = be.encode(images)
    expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(vectors, expected, atol=1e-5)


def test_float32_mode_never_evaluates_int8(repo):
    from simserver.training import train_domain

    be = QuantizingBackend(1e6)
    cfg = DomainConfig(name="shop", encoder_runtime={"mode": "float32"})
    report = train_domain(repo, cfg, _dataset(), be, mode="pretrained")
    assert report.meta["runtime"]["runtime"] == "float32" and be.calls == []
    assert report.meta["encoder"] == "fake"


def test_the_config_refuses_unknown_modes_and_losses():
    with pytest.raises(ValueError):
        DomainConfig(name="x", encoder_runtime={"mode": "int4"})
    with pytest.raises(ValueError):
        DomainConfig(name="x", encoder_runtime={"int8_max_loss": -0.1})
