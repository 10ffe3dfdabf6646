"""Fine-tuning a domain's embedding: a small head trained on frozen backbone features.

The head is one Dense layer (``embedding_dim``, L2-normalised output) followed, during training
only, by a cosine classifier over the domain's categories (the reference design's step 2), plus an
optional metric-learning loss on the same embedding (contrastive, triplet with semi-hard mining,
or multi-similarity). The backbone is frozen, so its features are computed once per image and the
head trains on them in a fraction of a second, in NumPy with the gradients written out (checked
against TensorFlow's autodiff of the losses' TF definitions, :mod:`simserver.losses`): a fit
traces no graph and imports no TensorFlow. The served encoder is backbone + head saved as one
SavedModel (:func:`export_finetuned`), loadable by the same
``tensorflow_hub`` loader as any encoder.

With ``blend`` (default) the trained head is widened into one linear layer whose output is the
pretrained features beside the head's embedding (:func:`blended`), which keeps new categories
searchable; the export and the serving path are the same for it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from simserver import metrics
from simserver.losses import NUMPY_METRIC_LOSSES, similarity_preservation_np

logger = logging.getLogger(__name__)

HEAD_FILE = "head.npz"
INFO_FILE = "encoder.json"


TrainingMode = Literal["auto", "finetune", "pretrained"]


class PromotionRule(BaseModel):
    """``training.promotion``: when ``mode=auto`` promotes (:func:`simserver.evaluation.decide`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    promote_on: Literal["closed_set", "open_set"] = Field(
        "closed_set", description="whose Recall@1 gain must be above 0: stratified or whole-category hold-out"
    )
    max_open_set_drop: float | None = Field(
        0.01, ge=0, le=1, description="open-set Recall@1 may fall at most this below pretrained (null: any)"
    )
    require_interval: bool = Field(True, description="the gain's bootstrap interval must be above 0")
    confidence: float = Field(0.95, gt=0, lt=1)
    bootstrap_samples: int = Field(1000, ge=100, le=100_000)
    open_set: bool = Field(True, description="also evaluate with whole categories held out")
    open_set_fraction: float = Field(0.3, gt=0, lt=1, description="of the categories, held out whole")


class TrainingConfig(BaseModel):
    """``training:`` in ``domains/<name>.yaml``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: TrainingMode = Field(
        "auto", description="auto: promote the fine-tuned encoder only if it beats pretrained on the hold-out"
    )
    embedding_dim: int = Field(256, ge=8, le=4096)
    metric_loss: Literal["none", "contrastive", "triplet", "multi_similarity"] = Field(
        "none", description="metric-learning loss added to the classification loss"
    )
    epochs: int = Field(
        30, ge=1, le=1000, description="steps = epochs x training rows / batch_size (at least 50)"
    )
    batch_size: int = Field(
        64,
        ge=8,
        le=1024,
        description="at most; a batch is min(categories, batch_size/4) categories x 4 images",
    )
    learning_rate: float = Field(1e-3, gt=0, le=1)
    dropout: float = Field(0.2, ge=0, lt=1, description="on the backbone features, while training")
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    min_holdout_per_class: int = Field(1, ge=1)
    augment_views: int = Field(
        0, ge=0, le=16, description="augmented copies per training image (each costs one encoding)"
    )
    augment_max_images: int = Field(
        500, ge=0, description="augment only sets up to this size (each view costs one encoding)"
    )
    seed: int = 0
    promotion: PromotionRule = PromotionRule()
    blend: float = Field(
        1.0,
        ge=0,
        le=10,
        description="weight of the pretrained embedding concatenated to the head's (0: the head alone); "
        "keeps what the pretrained embedding knows about categories the head never saw",
    )
    preserve: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="weight of a term keeping the head's similarities between a batch's images close to "
        "the pretrained features' (similarity-preserving distillation; 0: off)",
    )
    open_set_preserve: float = Field(
        4.0,
        ge=0,
        le=1000,
        description="mode auto: when open-set Recall@1 falls more than promotion.max_open_set_drop below "
        "pretrained, both heads are refitted with this similarity-preservation weight (when above "
        "preserve) and kept if the open set gains, before the blend is raised; 0: the blend only",
    )
    blend_max: float = Field(
        8.0,
        ge=0,
        le=100,
        description="mode auto: while open-set Recall@1 falls more than promotion.max_open_set_drop below "
        "pretrained, the blend weight is doubled, up to this (no refit: the same heads re-weighted)",
    )

    def output_dim(self, backbone_dim: int) -> int:
        """Dimension of the fine-tuned embedding (what the export template is traced for)."""
        return self.embedding_dim + (backbone_dim if self.blend > 0 else 0)


@dataclass(frozen=True)
class Head:
    kernel: np.ndarray  # [backbone_dim, embedding_dim]
    bias: np.ndarray  # [embedding_dim]

    def apply(self, features: np.ndarray) -> np.ndarray:
        """Backbone features -> the fine-tuned embedding (what the exported SavedModel computes)."""
        x = metrics.l2_normalize(features)
        return metrics.l2_normalize(x @ self.kernel + self.bias)

    def pack(self) -> np.ndarray:
        """One array (kernel rows, then the bias row) to pass between processes."""
        return np.concatenate([self.kernel, self.bias[None]], axis=0).astype(np.float32)

    @classmethod
    def unpack(cls, packed: np.ndarray) -> Head:
        packed = np.asarray(packed, dtype=np.float32)
        return cls(packed[:-1].copy(), packed[-1].copy())


def _balanced_batches(
    labels: np.ndarray, batch_size: int, steps: int, rng: np.random.Generator
) -> np.ndarray:
    """[steps, batch] indices: P classes x K=4 images each, so every batch has positive pairs for
    the metric losses and small classes are not drowned out by large ones."""
    per_class = 4
    classes = np.unique(labels)
    members = {c: np.flatnonzero(labels == c) for c in classes}
    p = max(2, min(len(classes), batch_size // per_class))
    out = np.empty((steps, p * per_class), dtype=np.int64)
    for s in range(steps):
        chosen = rng.choice(classes, size=p, replace=len(classes) < p)
        out[s] = np.concatenate(
            [rng.choice(members[c], size=per_class, replace=len(members[c]) < per_class) for c in chosen]
        )
    return out


def train_head(features: np.ndarray, labels: list[str] | np.ndarray, config: TrainingConfig) -> Head:
    """Train the head on backbone features (one row per image or augmented view)."""
    x_all = metrics.l2_normalize(np.asarray(features, dtype=np.float32))
    names, y_all = np.unique(np.asarray(labels), return_inverse=True)
    if len(names) < 2:
        raise ValueError("fine-tuning needs at least two categories")
    n, d = x_all.shape
    rng = np.random.default_rng(config.seed)
    batch = config.batch_size
    steps = max(50, config.epochs * math.ceil(n / batch))
    plan = _balanced_batches(y_all, batch, steps, rng)
    init = initial_head(rng, d, config.embedding_dim, len(names))
    kernel, bias, first, loss = _fit_numpy(x_all, y_all, plan, init, config, rng)
    logger.debug("head: %d steps, loss %.4f -> %.4f", len(plan), first, loss)
    if not np.isfinite(loss):
        raise RuntimeError(f"head training diverged (loss {loss})")
    head = Head(kernel, bias)
    return blended(head, x_all, config.blend) if config.blend > 0 else head


# Normalised-softmax temperature: cosine logits need it to reach confident outputs.
SCALE = 16.0
ADAM = (0.9, 0.999, 1e-7)  # beta1, beta2, epsilon


def initial_head(rng: np.random.Generator, d: int, embedding_dim: int, classes: int) -> list[np.ndarray]:
    """Starting (kernel, bias, proxies) of a head and its cosine classifier. Orthogonal kernel: at
    the start the head is a rotation-like projection, so the embedding begins close to the
    pretrained one's geometry instead of random. The first k columns of a side x side Gaussian's Q
    depend only on its first k columns: the reduced QR of those gives the same matrix as the full
    QR for a fifth of its cost (that QR of 1280 x 1280 was 0.27 s of a fit)."""
    side = max(d, embedding_dim)
    q, _ = np.linalg.qr(rng.normal(size=(side, side))[:, :embedding_dim])
    return [
        q[:d].astype(np.float32),
        np.zeros(embedding_dim, np.float32),
        rng.normal(0, 1, (embedding_dim, classes)).astype(np.float32),
    ]


def softmax_loss_and_grads(
    xb: np.ndarray,
    yb: np.ndarray,
    kernel: np.ndarray,
    bias: np.ndarray,
    proxies: np.ndarray,
    *,
    metric_loss: str = "none",
    preserve: float = 0.0,
) -> tuple[float, list[np.ndarray]]:
    """The cosine-classifier loss of one batch and its gradients for (kernel, bias, proxies),
    written out: ``mean CE(y, SCALE * l2norm(x @ kernel + bias) @ l2norm_columns(proxies))``, plus
    ``metric_loss`` on the same embedding (one of :data:`NUMPY_METRIC_LOSSES`) and ``preserve`` x
    :func:`similarity_preservation_np`. Checked against TensorFlow's autodiff in the tests."""
    z = xb @ kernel + bias
    z_norm = np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    emb = z / z_norm
    p_norm = np.maximum(np.linalg.norm(proxies, axis=0, keepdims=True), 1e-12)
    unit = proxies / p_norm
    logits = SCALE * (emb @ unit)
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(len(yb))
    loss = float(np.mean(np.log(total[:, 0]) - logits[rows, yb]))
    grad_logits = exp / total
    grad_logits[rows, yb] -= 1.0
    grad_logits *= SCALE / len(yb)
    grad_emb = grad_logits @ unit.T
    if metric_loss != "none":
        extra, grad_extra = NUMPY_METRIC_LOSSES[metric_loss](emb, yb)
        loss += extra
        grad_emb = grad_emb + grad_extra
    if preserve > 0:
        extra, grad_extra = similarity_preservation_np(emb, metrics.l2_normalize(xb))
        loss += preserve * extra
        grad_emb = grad_emb + np.float32(preserve) * grad_extra
    grad_unit = emb.T @ grad_logits
    # Through u = v / |v|: dv = (du - u <u, du>) / |v|, per row (embeddings) and column (proxies).
    grad_z = (grad_emb - emb * np.sum(emb * grad_emb, axis=1, keepdims=True)) / z_norm
    grad_proxies = (grad_unit - unit * np.sum(unit * grad_unit, axis=0, keepdims=True)) / p_norm
    return loss, [xb.T @ grad_z, grad_z.sum(axis=0), grad_proxies]


def _fit_numpy(
    x_all: np.ndarray,
    y_all: np.ndarray,
    plan: np.ndarray,
    init: list[np.ndarray],
    config: TrainingConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Adam on :func:`softmax_loss_and_grads`, in NumPy: these losses need no autodiff, and a
    TensorFlow graph costs more to trace (~0.6-1 s, every fit) than these steps take to run
    (~2 ms each at 1280 x 256)."""
    params = [p.copy() for p in init]
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    beta1, beta2, eps = ADAM
    drop = float(config.dropout)
    first = loss = float("nan")
    for t, idx in enumerate(plan, start=1):
        xb = x_all[idx]
        if drop > 0:
            xb = xb * ((rng.random(xb.shape, dtype=np.float32) >= drop) / np.float32(1.0 - drop))
        loss, grads = softmax_loss_and_grads(
            xb, y_all[idx], *params, metric_loss=config.metric_loss, preserve=config.preserve
        )
        if t == 1:
            first = loss
        step = np.float32(config.learning_rate * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t))
        for var, grad, (m, v) in zip(params, grads, moments, strict=True):
            grad = grad.astype(np.float32, copy=False)
            m *= beta1
            m += (1.0 - beta1) * grad
            v *= beta2
            v += (1.0 - beta2) * np.square(grad)
            var -= step * m / (np.sqrt(v) + eps)
    return params[0], params[1], first, loss


def blended(head: Head, features: np.ndarray, weight: float) -> Head:
    """One linear head computing ``l2norm([weight * x, beta * (x @ kernel + bias)])`` for
    L2-normalised features ``x``: the pretrained embedding beside the fine-tuned one, ``beta``
    scaling the head's output to unit norm on average over ``features``. A head fine-tuned on a
    few hundred images gathers the categories it saw and scatters the ones it did not (measured:
    open-set Recall@1 fell 4 to 13 points below pretrained); the pretrained half keeps those."""
    x = metrics.l2_normalize(np.asarray(features, dtype=np.float32))
    z = x @ head.kernel + head.bias
    beta = 1.0 / max(float(np.linalg.norm(z, axis=1).mean()), 1e-6)
    d = head.kernel.shape[0]
    kernel = np.concatenate([weight * np.eye(d, dtype=np.float32), beta * head.kernel], axis=1)
    bias = np.concatenate([np.zeros(d, np.float32), beta * head.bias])
    return Head(kernel.astype(np.float32), bias.astype(np.float32))


def blend_weight(head: Head) -> float | None:
    """The pretrained half's weight of a :func:`blended` head (None for any other head)."""
    d = head.kernel.shape[0]
    if head.kernel.shape[1] <= d:
        return None
    block = head.kernel[:, :d]
    diagonal = np.diagonal(block)
    w = float(diagonal[0])
    # Every off-diagonal entry within 1e-6 of 0, counted without building a d x d identity.
    off_diagonal = int(np.count_nonzero(np.abs(block) > 1e-6)) - int(
        np.count_nonzero(np.abs(diagonal) > 1e-6)
    )
    if w <= 0 or not np.allclose(diagonal, w, atol=1e-6) or off_diagonal:
        return None
    return w


def reweighted(head: Head, weight: float) -> Head:
    """A :func:`blended` head with its pretrained half's weight set to ``weight`` (the fine-tuned
    half unchanged): a larger weight moves the embedding towards the pretrained one, no refit."""
    if blend_weight(head) is None:
        raise ValueError("not a blended head")
    d = head.kernel.shape[0]
    kernel = head.kernel.copy()
    kernel[:, :d] = weight * np.eye(d, dtype=kernel.dtype)
    return Head(kernel, head.bias)


# -- export: backbone + head as one SavedModel ------------------------------------------------------
def export_finetuned(backbone: Any, head: Head, out_dir: Path, image_size: int = 224) -> Any:
    """Save ``l2norm(l2norm(backbone(x)) @ kernel + bias)`` as a reusable SavedModel at
    ``out_dir/saved_model``; return the module (its ``head_kernel``/``head_bias`` variables can be
    re-assigned and written as a checkpoint over a copy, see ``EncoderPool.export``).

    ``backbone``: a TF Hub handle or an already loaded SavedModel object.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tensorflow_hub as hub

    if isinstance(backbone, str | Path):
        backbone = hub.load(str(backbone))
    kernel = tf.Variable(head.kernel, trainable=False, name="head_kernel")
    bias = tf.Variable(head.bias, trainable=False, name="head_bias")

    # AutoTrackable, as in effnet_port: tf.Module's read-only `variables` clashes with the hub attribute.
    class Module(tf.__internal__.tracking.AutoTrackable):
        def __init__(self) -> None:
            self.backbone = backbone
            self.head_kernel = kernel
            self.head_bias = bias
            # The TF Hub reusable-SavedModel attributes hub.KerasLayer looks for.
            self.variables = [*getattr(backbone, "variables", []), kernel, bias]
            self.trainable_variables: list[Any] = []
            self.regularization_losses: list[Any] = []

        @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)])
        def __call__(self, images):
            features = tf.math.l2_normalize(self.backbone(images), axis=-1)
            return tf.math.l2_normalize(tf.matmul(features, self.head_kernel) + self.head_bias, axis=-1)

    module = Module()
    tf.saved_model.save(
        module, str(Path(out_dir) / "saved_model"), signatures={"serving_default": module.__call__}
    )
    return module


def write_head_files(folder: Path, head: Head, info: dict) -> None:
    """``head.npz`` and ``encoder.json`` (backbone encoder, ids) beside an exported SavedModel."""
    np.savez(Path(folder) / HEAD_FILE, kernel=head.kernel, bias=head.bias)
    (Path(folder) / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))


def load_head(folder: Path) -> tuple[Head, dict] | None:
    """The head and info saved beside an exported SavedModel, or None for any other model."""
    folder = Path(folder)
    if not (folder / HEAD_FILE).is_file() or not (folder / INFO_FILE).is_file():
        return None
    with np.load(folder / HEAD_FILE) as z:
        head = Head(z["kernel"].astype(np.float32), z["bias"].astype(np.float32))
    return head, json.loads((folder / INFO_FILE).read_text())
