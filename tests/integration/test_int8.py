"""The int8 runtime of the built-in encoder: shipped by `encoder build`, self-checked at load
against its own reference outputs, close to float32 on real photos."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.integration.conftest import DEMO


def _demo_pixels(n: int = 24) -> np.ndarray:
    from simserver.preprocess import prepare

    files = sorted(p for p in (DEMO / "food").rglob("*") if p.is_file())[:n]
    return np.stack([prepare(p.read_bytes(), 224, 10**8) for p in files])


@pytest.fixture(scope="module")
def int8(builtin_tag, tmp_path_factory):
    from simserver.encoder_pool import EncoderPool

    return EncoderPool(cache_dir=tmp_path_factory.mktemp("int8-cache")).get("int8:builtin")


def test_int8_runtime_is_close_to_float32_and_batch_independent(int8, encoder):
    assert int8.runtime == "tflite-int8" and int8.name == "int8:builtin"
    assert int8.id == f"{encoder.id}+int8" and int8.dim == encoder.dim == 1280
    images = _demo_pixels()
    f, q = encoder.encode(images), int8.encode(images)
    assert np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    cos = np.sum(f * q, axis=1)
    assert cos.mean() > 0.95 and cos.min() > 0.8, cos  # close, not equal: a 0.999 check would fail
    assert cos.mean() < 0.9999  # and really quantized
    # A lone image (one interpreter, every thread) and a batch (one per CPU) give the same vectors.
    lone = np.concatenate([int8.encode(images[i : i + 1]) for i in range(4)])
    assert np.allclose(lone, q[:4], atol=1e-4)


def test_int8_self_check_refuses_a_model_that_does_not_match_its_reference(int8, tmp_path):
    from simserver.encoder import builtin_model_path
    from simserver.int8 import INT8_FILE, REFERENCE_FILE, Int8Encoder

    _, saved_model = builtin_model_path("efficientnet-lite0-imagenet")
    shutil.copy(saved_model.parent / INT8_FILE, tmp_path / INT8_FILE)
    reference = np.load(saved_model.parent / REFERENCE_FILE)
    np.save(tmp_path / REFERENCE_FILE, reference)
    ok = Int8Encoder("builtin", "x", tmp_path / "saved_model", builtin=True, threads=1)
    assert ok.dim == 1280
    np.save(tmp_path / REFERENCE_FILE, reference[::-1])  # another image's outputs
    with pytest.raises(ValueError, match="int8 TFLite output differs"):
        Int8Encoder("builtin", "x", tmp_path / "saved_model", builtin=True, threads=1)


def test_a_fine_tuned_encoders_int8_runtime_is_its_int8_backbone_and_float32_head(builtin_tag, tmp_path):
    from simserver.encoder_pool import EncoderPool
    from simserver.finetune import Head
    from simserver.metrics import l2_normalize
    from simserver.store import LocalStore

    pool = EncoderPool(cache_dir=tmp_path / "cache", store=LocalStore(tmp_path / "store"))
    rng = np.random.default_rng(0)
    head = Head(rng.normal(size=(1280, 16)).astype(np.float32), rng.normal(size=16).astype(np.float32))
    encoder = pool.export("builtin", head, "domains/d/versions/v1/encoder.tar", {"id": "ft:d/v1"})
    int8 = pool.get(f"int8:{encoder}")
    assert int8.runtime == "tflite-int8+head" and int8.id == "ft:d/v1+int8" and int8.dim == 16
    images = _demo_pixels(6)
    expected = l2_normalize(head.apply(pool.get("int8:builtin").encode(images)))
    assert np.allclose(int8.encode(images), expected, atol=1e-5)
    # Not the float32 encoder's vectors: the version's runtime is part of the encoder's name.
    assert not np.allclose(pool.get(encoder).encode(images), expected, atol=1e-3)
