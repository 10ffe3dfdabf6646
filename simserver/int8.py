"""The int8 encoder runtime: a full-integer TFLite model of a base encoder, served per domain only
where its own hold-out shows it loses at most ``encoder_runtime.int8_max_loss``.

Names: ``int8:<encoder>`` is the int8 runtime of ``<encoder>`` (``int8:builtin``, ``int8:<TF Hub
handle or folder>``, or ``int8:store:<key>``: a fine-tuned encoder whose backbone runs int8 and
whose head stays float32 in NumPy). A version records the encoder its vectors came from, so its
index and query vectors always come from the same runtime (:func:`simserver.searcher.served_encoder`).

The int8 model of a base encoder is built once per encoder: the built-in one at ``simserver
encoder build`` time (shipped beside its float32 ``model.tflite``), any other one on first use
(cached like the float32 conversion). Activation ranges are calibrated on a representative set
(:func:`calibration_images`: training-split images of the bundled demo domains); weights are
quantized per output channel (the converter's default for convolutions). Its outputs on the
self-check images are stored beside it and checked at every load (cosine >= 0.999), as the
float32 runtime is checked against the SavedModel.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from simserver import metrics
from simserver.encoder import (
    IMAGE_SIZE,
    _quiet_tf,
    _TFLiteRunner,
    check_reproduces,
    load_npy,
    model_digest,
    npy_bytes,
    probe_images,
)
from simserver.store import LocalStore

logger = logging.getLogger(__name__)

INT8_PREFIX = "int8:"
INT8_FILE = "model_int8.tflite"
REFERENCE_FILE = "model_int8_reference.npy"  # its own outputs on probe_images(), for the self-check
CALIBRATION_IMAGES = 64


def int8_name(encoder: str) -> str:
    return encoder if is_int8(encoder) else INT8_PREFIX + encoder


def is_int8(encoder: str) -> bool:
    return encoder.startswith(INT8_PREFIX)


def float_name(encoder: str) -> str:
    """The float32 encoder an ``int8:`` name quantizes (any other name is returned as is)."""
    return encoder[len(INT8_PREFIX) :] if is_int8(encoder) else encoder


def calibration_images(n: int = CALIBRATION_IMAGES, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [n, S, S, 3]: training-split images of the bundled demo domains, dealt evenly over
    domains and categories (deterministic); the self-check images if no demo folder ships."""
    from simserver.domain_config import Limits
    from simserver.evaluation import stratified_split
    from simserver.ingest import read_folder
    from simserver.settings import PROJECT_ROOT

    demo = PROJECT_ROOT / "demo"
    pools = []
    for folder in sorted(p for p in demo.iterdir() if p.is_dir()) if demo.is_dir() else []:
        samples = read_folder(folder, Limits(), image_size).samples
        split = stratified_split([s.label for s in samples])
        order = np.random.default_rng(0).permutation(split.train)
        pools.append([samples[i] for i in order])
    picked = [pool[i] for i in range(max(map(len, pools), default=0)) for pool in pools if i < len(pool)]
    if not picked:
        logger.warning("no demo images to calibrate int8 on: using the self-check images")
        return probe_images(image_size)
    return np.stack([s.pixels for s in picked[:n]])


def convert_int8(saved_model: Path, representative: np.ndarray) -> bytes:
    """SavedModel -> full-integer TFLite (int8 weights per channel and activations; float32 input
    and output, so it is called exactly like the float32 model)."""
    _quiet_tf()
    import tensorflow as tf

    def images():
        for pixels in representative:
            yield [pixels[None].astype(np.float32) / 255.0]

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = images
    return converter.convert()


def reference_outputs(model: bytes, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The int8 model's vectors of the self-check images, on one batch-1 interpreter."""
    from simserver.encoder import TFLiteInterpreter

    x = probe_images(image_size).astype(np.float32) / 255.0
    return metrics.l2_normalize(TFLiteInterpreter(model, 1)(x))


def write_builtin_int8(model_dir: Path, saved_model: Path) -> None:
    """The int8 runtime beside the built-in model's float32 one (at ``simserver encoder build``)."""
    model = convert_int8(saved_model, calibration_images())
    (model_dir / INT8_FILE).write_bytes(model)
    (model_dir / REFERENCE_FILE).write_bytes(npy_bytes(reference_outputs(model)))


def int8_model(local: Path, builtin: bool, cache_dir: Path | None) -> tuple[bytes, np.ndarray]:
    """(int8 flatbuffer, its reference outputs) of the SavedModel folder ``local``: the built-in
    model's shipped one, else converted once and cached (a built-in model built before int8 shipped
    is converted the same way)."""
    shipped = local.parent / INT8_FILE
    if builtin and shipped.is_file() and (local.parent / REFERENCE_FILE).is_file():
        reference = load_npy((local.parent / REFERENCE_FILE).read_bytes())
        return shipped.read_bytes(), reference
    key = f"tflite/{model_digest(local)}"  # + .int8.*: beside the float32 conversion's files
    cache = LocalStore(cache_dir) if cache_dir else None
    if cache is not None:
        try:
            data, ref = cache.get(f"{key}.int8.tflite"), cache.get(f"{key}.int8.npy")
            return data, load_npy(ref)
        except KeyError:
            pass
    logger.info("converting %s to int8 (calibrating on %d images)", local, CALIBRATION_IMAGES)
    data = convert_int8(local, calibration_images())
    reference = reference_outputs(data)
    if cache is not None:
        cache.put(f"{key}.int8.npy", npy_bytes(reference))
        cache.put(f"{key}.int8.tflite", data)  # read first above, so written last
    return data, reference


class Int8Encoder:
    """A base encoder's int8 runtime, with the float32 runtime's batching layout
    (:class:`simserver.encoder._TFLiteRunner`); checked against its own reference outputs."""

    def __init__(
        self,
        encoder: str,
        float_id: str,
        saved_model: Path,
        *,
        builtin: bool,
        cache_dir: Path | None = None,
        threads: int = 1,
        image_size: int = IMAGE_SIZE,
    ) -> None:
        model, reference = int8_model(saved_model, builtin, cache_dir)
        self.name = int8_name(encoder)
        self.id = f"{float_id}+int8"
        self.image_size = image_size
        self.runtime = "tflite-int8"
        self._tflite = _TFLiteRunner(model, threads)
        x = probe_images(image_size).astype(np.float32) / 255.0
        got = np.concatenate([self._tflite(x[:1]), self._tflite(x[1:])])  # a lone image and a batch
        check_reproduces("int8 TFLite", reference, metrics.l2_normalize(got))
        self.dim = int(got.shape[1])
        logger.info("loaded encoder %s (dim %d, runtime %s)", self.id, self.dim, self.runtime)

    def batch_stats(self) -> dict:
        return self._tflite.batcher.stats.snapshot()

    def encode(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected [N, {self.image_size}, {self.image_size}, 3], got {images.shape}")
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        return metrics.l2_normalize(self._tflite(images.astype(np.float32) / 255.0))
