"""The built-in encoder: real ImageNet weights, loaded through tensorflow_hub, unit vectors."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import DEMO, TEST_DATA

# ImageNet-1k class indices (facts of the label set, not results).
ESPRESSO = 967
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
HAMMER = 587
SCISSORS = 572


def _pixels(img_or_bytes) -> np.ndarray:
    from simserver.preprocess import prepare

    if isinstance(img_or_bytes, np.ndarray):
        buf = io.BytesIO()
        Image.fromarray(img_or_bytes).save(buf, "PNG")
        img_or_bytes = buf.getvalue()
    return prepare(img_or_bytes, 224, 10**8)


@pytest.fixture(scope="module")
def hub_module(builtin_tag):
    import tensorflow_hub as hub

    from simserver.encoder import builtin_model_path

    _, path = builtin_model_path("efficientnet-lite0-imagenet")
    return hub.load(str(path))


def _top1(module, pixels: np.ndarray) -> int:
    import tensorflow as tf

    logits = module.classify(tf.constant(pixels[None].astype(np.float32) / 255.0)).numpy()[0]
    return int(np.argmax(logits))


def test_ported_classifier_names_real_photos(hub_module):
    from skimage import data

    assert _top1(hub_module, _pixels(data.coffee())) == ESPRESSO
    assert _top1(hub_module, _pixels(data.chelsea())) in CATS
    assert _top1(hub_module, _pixels((TEST_DATA / "hammer1.webp").read_bytes())) == HAMMER


def test_features_are_unit_1280d_and_deterministic(encoder):
    imgs = np.stack([_pixels(p.read_bytes()) for p in sorted((DEMO / "fashion" / "dress").iterdir())])
    a = encoder.encode(imgs)
    b = encoder.encode(imgs[::-1])[::-1]
    assert a.shape == (3, 1280) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_same_item_other_style_is_nearer_than_other_item(encoder):
    def vec(p):
        return encoder.encode(_pixels(p.read_bytes())[None])[0]

    dress_g, dress_t = vec(DEMO / "fashion/dress/google.png"), vec(DEMO / "fashion/dress/twitter.png")
    boot_t = vec(DEMO / "fashion/boot/twitter.png")
    assert dress_g @ dress_t > dress_g @ boot_t


def _tiny_saved_model(folder, weight: float = 1.0):
    """A reusable SavedModel returning each image's mean colour and ``weight`` x its brightness (a
    variable: two weights are two models with the same graph)."""
    import tensorflow as tf

    class Tiny(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = tf.Variable(weight, dtype=tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)])
        def __call__(self, images):
            mean = tf.reduce_mean(images, axis=[1, 2])
            return tf.concat([mean, self.weight * tf.reduce_mean(mean, axis=1, keepdims=True)], axis=1)

    tf.saved_model.save(Tiny(), str(folder))
    return folder


def test_local_saved_model_path_goes_through_the_same_loader(encoder, tmp_path):
    from simserver.encoder import Encoder, builtin_model_path

    # The built-in model's folder given as a plain path: same vectors.
    _, path = builtin_model_path("efficientnet-lite0-imagenet")
    by_path = Encoder(str(path))
    x = _pixels((TEST_DATA / "scissors1.webp").read_bytes())[None]
    np.testing.assert_allclose(by_path.encode(x), encoder.encode(x), atol=1e-5)

    # Any other reusable SavedModel: a tiny one that returns mean colour and brightness.
    tiny = Encoder(str(_tiny_saved_model(tmp_path / "tiny")))
    assert tiny.dim == 4
    red = np.zeros((1, 224, 224, 3), np.uint8)
    red[..., 0] = 255
    v = tiny.encode(red)[0]
    np.testing.assert_allclose(v, np.array([1, 0, 0, 1 / 3]) / np.linalg.norm([1, 0, 0, 1 / 3]), atol=1e-5)


def test_a_tflite_start_checks_against_stored_vectors_without_loading_the_saved_model(tmp_path):
    """The self-check compares the TFLite model's vectors of the probe images with the SavedModel's,
    computed once (with TF) and cached beside the conversion under the SavedModel's digest, so a
    later start loads no SavedModel; what the cache holds is never trusted over the SavedModel."""
    import os
    import shutil

    from simserver.encoder import Encoder, model_digest, npy_bytes

    tiny, cache = _tiny_saved_model(tmp_path / "tiny"), tmp_path / "cache"
    first = Encoder(str(tiny), cache_dir=cache)  # converts, runs the SavedModel once, stores both
    refs = sorted(cache.rglob("*.reference.npy"))
    assert first.runtime == "tflite" and len(refs) == 1
    assert first._layer is None  # loaded for the reference only, then freed: TFLite serves
    true_reference = np.load(refs[0])
    again = Encoder(str(tiny), cache_dir=cache)
    assert again.runtime == "tflite" and again.dim == 4 and again._layer is None
    red = np.zeros((2, 224, 224, 3), np.uint8)
    red[..., 0] = 255
    np.testing.assert_allclose(again.encode(red), first.encode(red), atol=1e-5)
    assert again.resolved is not None and again._layer is not None  # the export loads it when asked

    # A corrupted cached reference: the SavedModel is asked again, and the cache repaired.
    refs[0].write_bytes(npy_bytes(-true_reference))
    repaired = Encoder(str(tiny), cache_dir=cache, runtime="tflite")
    assert repaired.runtime == "tflite"
    np.testing.assert_allclose(np.load(refs[0]), true_reference, atol=1e-6)

    # Another model copied over the folder with its file times kept (rsync -a, tar): a new digest,
    # so neither the old conversion nor the old reference serves it.
    first_digest = model_digest(tiny)
    other = _tiny_saved_model(tmp_path / "other", weight=2.0)
    mtime = (tiny / "saved_model.pb").stat().st_mtime_ns
    shutil.rmtree(tiny)
    shutil.copytree(other, tiny)
    for path in tiny.rglob("*"):
        os.utime(path, ns=(mtime, mtime))
    assert model_digest(tiny) == model_digest(other) != first_digest
    assert len(sorted(cache.rglob("*.tflite"))) == 1
    swapped = Encoder(str(tiny), cache_dir=cache)
    assert swapped.runtime == "tflite" and len(sorted(cache.rglob("*.tflite"))) == 2
    np.testing.assert_allclose(
        swapped.encode(red), Encoder(str(other), runtime="savedmodel").encode(red), atol=1e-5
    )

    # The check still bites: a conversion that does not reproduce the SavedModel (the first model's,
    # cached under the second's digest) is refused, and auto falls back to the SavedModel.
    first_tflite = next(p for p in cache.rglob("*.tflite") if model_digest(tiny) not in p.name)
    (cache / "tflite" / f"{model_digest(tiny)}.tflite").write_bytes(first_tflite.read_bytes())
    with pytest.raises(ValueError, match="differs from the SavedModel"):
        Encoder(str(tiny), cache_dir=cache, runtime="tflite")
    fallback = Encoder(str(tiny), cache_dir=cache)
    assert fallback.runtime == "savedmodel" and fallback.dim == 4
    np.testing.assert_allclose(fallback.encode(red), swapped.encode(red), atol=1e-5)


def test_the_builtin_encoders_start_on_tflite_without_importing_tensorflow(builtin_tag):
    """The built-in image and text models ship their TFLite conversions and their SavedModels'
    reference vectors (``simserver encoder build``): a query process's start imports no TensorFlow
    (~4 s, and its memory) and loads no SavedModel."""
    code = (
        "import sys; from simserver.encoder import Encoder; from simserver.text_encoder import TextEncoder; "
        "e = Encoder('builtin'); t = TextEncoder('builtin'); "
        "print(e.runtime, e.dim, t.runtime, t.dim, 'tensorflow' in sys.modules, e._layer is None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == [
        "tflite",
        "1280",
        "tflite",
        "384",
        "False",
        "True",
    ], out.stderr[-2000:]


def test_tflite_runtime_reproduces_the_saved_model_on_real_photos(encoder):
    from simserver.encoder import Encoder

    assert encoder.runtime == "tflite"
    reference = Encoder("builtin", runtime="savedmodel")
    assert reference.runtime == "savedmodel"
    photos = [*sorted(TEST_DATA.glob("*.webp")), *sorted((DEMO / "almonds-suppliers/random").iterdir())[:13]]
    pixels = np.stack([_pixels(p.read_bytes()) for p in photos])
    cos = np.sum(encoder.encode(pixels) * reference.encode(pixels), axis=1)
    assert cos.min() >= 0.999, dict(zip([p.name for p in photos], cos.round(5), strict=True))


def test_wrong_input_shape_is_refused(encoder):
    with pytest.raises(ValueError, match="expected"):
        encoder.encode(np.zeros((1, 100, 100, 3), np.uint8))


def test_concurrent_calls_are_batched_and_each_gets_its_own_vectors(encoder):
    """Single-image calls from many threads share model runs (adaptive batching), and the batched
    path (single-thread interpreters in parallel) gives the same vectors as a lone call."""
    photos = [*sorted(TEST_DATA.glob("*.webp")), *sorted((DEMO / "almonds-suppliers/random").iterdir())[:13]]
    pixels = np.stack([_pixels(p.read_bytes()) for p in photos[:16]])
    alone = np.concatenate([encoder.encode(pixels[i : i + 1]) for i in range(len(pixels))])
    before = encoder.batch_stats()
    start = threading.Barrier(8)

    def worker(w: int) -> list[tuple[int, np.ndarray]]:
        start.wait()
        return [(i, encoder.encode(pixels[i : i + 1])[0]) for i in range(w, len(pixels), 8)]

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(worker, range(8)) for r in rs]
    after = encoder.batch_stats()
    assert sorted(i for i, _ in results) == list(range(len(pixels)))
    for i, v in results:
        assert float(v @ alone[i]) >= 0.99999
    assert after["calls"] - before["calls"] == len(pixels)
    assert after["rows"] - before["rows"] == len(pixels)
    assert after["runs"] - before["runs"] < len(pixels), after  # some calls went together
