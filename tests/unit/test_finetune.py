"""simserver.finetune without TensorFlow: the blended head and the config's output size."""

from __future__ import annotations

import numpy as np
import pytest

from simserver.finetune import Head, PromotionRule, TrainingConfig, blended


def test_blended_head_puts_the_pretrained_embedding_beside_the_heads():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    head = Head(rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32))
    both = blended(head, x, 0.5)
    assert both.kernel.shape == (8, 11) and both.bias.shape == (11,)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    raw = unit @ both.kernel + both.bias
    np.testing.assert_allclose(raw[:, :8], 0.5 * unit, rtol=1e-5, atol=1e-6)
    z = unit @ head.kernel + head.bias
    np.testing.assert_allclose(raw[:, 8:] / z, raw[0, 8] / z[0, 0], rtol=1e-4)  # one scale
    assert np.linalg.norm(raw[:, 8:], axis=1).mean() == pytest.approx(1.0, rel=1e-5)
    emb = both.apply(x)  # what the exported SavedModel and the served NumPy head compute
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # With the head's half switched off the ranking is the pretrained one.
    off = Head(np.concatenate([np.eye(8, dtype=np.float32), 0 * head.kernel], 1), np.zeros(11, np.float32))
    np.testing.assert_allclose(off.apply(x)[:, :8], unit, rtol=1e-5, atol=1e-6)


def test_output_dim_and_promotion_defaults():
    assert TrainingConfig().output_dim(1280) == 1280 + 256
    assert TrainingConfig(blend=0).output_dim(1280) == 256
    rule = TrainingConfig().promotion
    assert rule == PromotionRule() and rule.promote_on == "closed_set" and rule.require_interval
    assert rule.max_open_set_drop == 0.01 and TrainingConfig().augment_views == 0
    cfg = TrainingConfig.model_validate({"promotion": {"promote_on": "open_set", "max_open_set_drop": None}})
    assert cfg.promotion.promote_on == "open_set" and cfg.promotion.max_open_set_drop is None
    with pytest.raises(ValueError):
        TrainingConfig.model_validate({"promotion": {"promote_on": "sometimes"}})
