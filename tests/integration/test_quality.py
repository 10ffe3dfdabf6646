"""Issue 18's pieces with the real encoder: the tail experiment reproduces the backbone, and
`bench quality` reports the three methods with intervals on a small real set."""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration.conftest import DEMO


@pytest.fixture(scope="module")
def keras_parts():
    from simserver.effnet_port import build_keras_models, weights_path
    from simserver.torch_pickle import load_state_dict

    state = load_state_dict(weights_path())
    features_model, _, outputs = build_keras_models(state)
    return state, features_model, outputs


@pytest.fixture(scope="module")
def photos():
    from simserver.domain_config import Limits
    from simserver.ingest import read_folder

    ds = read_folder(DEMO / "fashion", Limits())
    return ds.samples[:24], np.stack([s.pixels for s in ds.samples[:24]]).astype(np.float32) / 255.0


@pytest.mark.parametrize("blocks", [0, 1, 2])
def test_pretrained_tail_reproduces_the_pooled_features(keras_parts, photos, blocks):
    """Trunk maps + the tail in NumPy (BatchNorm folded) and in TF == the whole backbone."""
    import tensorflow as tf
    import tf_keras as keras

    from simserver.effnet_port import BLOCKS
    from simserver.tail import pretrained_tail, tail_forward, tail_variables

    state, features_model, outputs = keras_parts
    _, x = photos
    trunk = keras.Model(features_model.inputs, outputs[BLOCKS - 1 - blocks])
    maps = trunk.predict(x, verbose=0)
    want = features_model.predict(x, verbose=0)
    tail = pretrained_tail(state, blocks)
    np.testing.assert_allclose(tail.pooled(maps.reshape(len(x), -1)), want, rtol=1e-3, atol=1e-4)
    got_tf = tail_forward(tf, tail_variables(tf, tail), tail, tf.constant(maps)).numpy()
    np.testing.assert_allclose(got_tf, want, rtol=1e-3, atol=1e-4)


def test_train_tail_gives_a_tail_whose_numpy_and_tf_forwards_agree(keras_parts, photos):
    import tensorflow as tf
    import tf_keras as keras

    from simserver.effnet_port import BLOCKS
    from simserver.finetune import TrainingConfig
    from simserver.tail import TailConfig, pretrained_tail, tail_forward, tail_variables, train_tail

    state, features_model, outputs = keras_parts
    samples, x = photos
    maps = keras.Model(features_model.inputs, outputs[BLOCKS - 2]).predict(x, verbose=0)
    labels = [s.label for s in samples]
    tail = train_tail(
        maps.reshape(len(x), -1),
        labels,
        TrainingConfig(embedding_dim=32),
        pretrained_tail(state, 1),
        TailConfig(min_steps=3, epochs=0.1),
    )
    assert tail.head is not None and tail.gem_p == 3.0
    emb = tail.apply(maps.reshape(len(x), -1))
    assert emb.shape == (len(x), 32) and np.all(np.isfinite(emb))
    pooled_tf = tail_forward(tf, tail_variables(tf, tail), tail, tf.constant(maps)).numpy()
    np.testing.assert_allclose(pooled_tf, tail.pooled(maps), rtol=1e-3, atol=1e-4)


def test_bench_quality_reports_every_method_with_intervals(builtin_tag, tmp_path, monkeypatch):
    from simserver.bench.quality import quality_figures
    from simserver.settings import get_settings

    monkeypatch.setenv("STORE_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    try:
        result = quality_figures(
            [DEMO / "almonds-suppliers"], methods=["pretrained", "head-only", "new", "blend-only"], splits=2
        )
    finally:
        get_settings.cache_clear()
    entry = result["sets"]["almonds-suppliers"]
    assert entry["images"] == 74 and entry["encode_seconds"] > 0
    assert set(entry["methods"]) == {"pretrained", "head-only", "new", "blend-only"}
    for name, row in entry["methods"].items():
        closed = row["closed_set"]
        lo, hi = closed["recall_at_1_ci"]
        assert lo <= closed["recall_at_1"] <= hi and closed["queries"] > 0
        assert row["train_x_encode"] >= 1.0 or name == "pretrained"
        assert "open_set" in row, name
    new = entry["methods"]["new"]
    assert new["closed_set"]["gain"]["ci"][0] <= new["closed_set"]["gain"]["recall_at_1"]
    assert new["blend"] >= 1.0 and entry["methods"]["head-only"]["blend"] is None  # head-only: no blend
    # blend-only never refits with similarity preservation; new does only when the open set asked
    blend_only = entry["methods"]["blend-only"]
    assert blend_only["preserve"] == 0.0 and new["preserve"] in (0.0, 4.0)
    if new["preserve"] == 0.0:
        assert new["closed_set"] == blend_only["closed_set"] and new["blend"] == blend_only["blend"]
    assert new["train_x_encode_with_open_set"] >= new["train_x_encode"]
    assert entry["methods"]["head-only"]["train_x_encode"] > new["train_x_encode"]  # pixel views cost
    # --splits: means over split seeds 0 and 1, seed 0 being the split the rows above report
    means = new["split_means"]
    assert means["splits"] == 2 and "split_means" not in entry["methods"]["pretrained"]
    seed1_closed = 2 * means["closed_finetuned"] - new["closed_set"]["recall_at_1"]
    seed1_pretrained = (
        2 * means["closed_pretrained"] - entry["methods"]["pretrained"]["closed_set"]["recall_at_1"]
    )
    assert 0 <= seed1_closed <= 1 and 0 <= seed1_pretrained <= 1
    assert means["closed_gain"] == pytest.approx(
        means["closed_finetuned"] - means["closed_pretrained"], abs=2e-4
    )
