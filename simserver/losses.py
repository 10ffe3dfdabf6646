"""The head's metric-learning losses on L2-normalised embeddings (cosine similarities), and the
similarity-preservation term: in NumPy with their gradients written out (``NUMPY_METRIC_LOSSES``,
what :mod:`simserver.finetune`'s fit adds to the classifier loss) and in TensorFlow
(``METRIC_LOSSES``: their reference definitions, which the tests differentiate by tape to check the
NumPy gradients, and the losses of the ``tail`` experiment's TF fit)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _pair_masks(tf, labels):
    same = tf.equal(labels[:, None], labels[None, :])
    eye = tf.eye(tf.shape(labels)[0], dtype=tf.bool)
    return tf.logical_and(same, tf.logical_not(eye)), tf.logical_not(same)


def contrastive_loss(tf, emb, labels, margin: float = 0.5):
    sim = tf.matmul(emb, emb, transpose_b=True)
    pos, neg = _pair_masks(tf, labels)
    pos_f, neg_f = tf.cast(pos, tf.float32), tf.cast(neg, tf.float32)
    pos_term = tf.reduce_sum((1.0 - sim) * pos_f) / tf.maximum(tf.reduce_sum(pos_f), 1.0)
    neg_term = tf.reduce_sum(tf.square(tf.nn.relu(sim - margin)) * neg_f) / tf.maximum(
        tf.reduce_sum(neg_f), 1.0
    )
    return pos_term + neg_term


def triplet_semihard_loss(tf, emb, labels, margin: float = 0.2):
    """For each anchor-positive pair: the closest negative farther than the positive (semi-hard),
    or, if there is none, the farthest negative (as in TF Addons' TripletSemiHardLoss)."""
    sim = tf.matmul(emb, emb, transpose_b=True)
    dist = tf.sqrt(tf.maximum(2.0 - 2.0 * sim, 1e-12))
    pos, neg = _pair_masks(tf, labels)
    d_ap = dist[:, :, None]  # [a, p, 1]
    d_an = dist[:, None, :]  # [a, 1, n]
    neg3 = tf.broadcast_to(neg[:, None, :], tf.shape(d_an * d_ap))
    outside = tf.logical_and(neg3, d_an > d_ap)
    big = tf.constant(1e9, tf.float32)
    semi = tf.reduce_min(tf.where(outside, tf.broadcast_to(d_an, tf.shape(neg3)), big), axis=2)
    hardest_far = tf.reduce_max(
        tf.where(neg[:, None, :], tf.broadcast_to(d_an, tf.shape(neg3)), -big), axis=2
    )
    chosen = tf.where(tf.reduce_any(outside, axis=2), semi, hardest_far)
    loss = tf.nn.relu(dist - chosen + margin)
    pos_f = tf.cast(tf.logical_and(pos, tf.reduce_any(neg, axis=1)[:, None]), tf.float32)
    return tf.reduce_sum(loss * pos_f) / tf.maximum(tf.reduce_sum(pos_f), 1.0)


def multi_similarity_loss(tf, emb, labels, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    """Wang et al. 2019, with its pair mining (positives harder than the easiest negative + eps,
    negatives harder than the hardest positive - eps)."""
    sim = tf.matmul(emb, emb, transpose_b=True)
    pos, neg = _pair_masks(tf, labels)
    big = tf.constant(1e9, tf.float32)
    max_neg = tf.reduce_max(tf.where(neg, sim, -big), axis=1, keepdims=True)
    min_pos = tf.reduce_min(tf.where(pos, sim, big), axis=1, keepdims=True)
    pos_keep = tf.logical_and(pos, sim - epsilon < max_neg)
    neg_keep = tf.logical_and(neg, sim + epsilon > min_pos)
    pos_sum = tf.reduce_sum(tf.where(pos_keep, tf.exp(-alpha * (sim - base)), 0.0), axis=1)
    neg_sum = tf.reduce_sum(tf.where(neg_keep, tf.exp(beta * (sim - base)), 0.0), axis=1)
    per_anchor = tf.math.log1p(pos_sum) / alpha + tf.math.log1p(neg_sum) / beta
    return tf.reduce_mean(per_anchor)


METRIC_LOSSES = {
    "contrastive": contrastive_loss,
    "triplet": triplet_semihard_loss,
    "multi_similarity": multi_similarity_loss,
}


# The same losses in NumPy, as (loss, d loss / d emb) of a batch: with their gradients written out,
# a fit needs no TensorFlow graph (whose tracing, ~1 s per fit, cost more than the fit itself).
# Mining masks are constants of the step, as they are under TensorFlow's tape.
def _pair_masks_np(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    same = labels[:, None] == labels[None, :]
    return same & ~np.eye(len(labels), dtype=bool), ~same


def contrastive_loss_np(emb: np.ndarray, labels: np.ndarray, margin: float = 0.5) -> tuple[float, np.ndarray]:
    """:func:`contrastive_loss` and its gradient."""
    sim = emb @ emb.T
    pos, neg = _pair_masks_np(labels)
    n_pos, n_neg = max(float(pos.sum()), 1.0), max(float(neg.sum()), 1.0)
    over = np.maximum(sim - margin, 0.0)
    loss = float(((1.0 - sim) * pos).sum() / n_pos + (np.square(over) * neg).sum() / n_neg)
    g_sim = 2.0 * over * neg / n_neg - pos / n_pos
    return loss, ((g_sim + g_sim.T) @ emb).astype(emb.dtype, copy=False)


def multi_similarity_loss_np(
    emb: np.ndarray, labels: np.ndarray, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1
) -> tuple[float, np.ndarray]:
    """:func:`multi_similarity_loss` and its gradient."""
    sim = emb @ emb.T
    pos, neg = _pair_masks_np(labels)
    max_neg = np.where(neg, sim, -1e9).max(axis=1, keepdims=True)
    min_pos = np.where(pos, sim, 1e9).min(axis=1, keepdims=True)
    pos_exp = np.where(pos & (sim - epsilon < max_neg), np.exp(-alpha * (sim - base)), 0.0)
    neg_exp = np.where(neg & (sim + epsilon > min_pos), np.exp(beta * (sim - base)), 0.0)
    pos_sum, neg_sum = pos_exp.sum(axis=1, keepdims=True), neg_exp.sum(axis=1, keepdims=True)
    loss = float(np.mean(np.log1p(pos_sum[:, 0]) / alpha + np.log1p(neg_sum[:, 0]) / beta))
    g_sim = (neg_exp / (1.0 + neg_sum) - pos_exp / (1.0 + pos_sum)) / len(labels)
    return loss, ((g_sim + g_sim.T) @ emb).astype(emb.dtype, copy=False)


def triplet_semihard_loss_np(
    emb: np.ndarray, labels: np.ndarray, margin: float = 0.2, block_elements: int = 1 << 22
) -> tuple[float, np.ndarray]:
    """:func:`triplet_semihard_loss` and its gradient: each anchor-positive pair's negative is mined
    as there (the closest one farther than the positive, else the farthest), then held fixed."""
    b = len(labels)
    sim = emb @ emb.T
    raw = 2.0 - 2.0 * sim
    dist = np.sqrt(np.maximum(raw, 1e-12))
    pos, neg = _pair_masks_np(labels)
    chosen = np.empty((b, b), np.int64)  # [a, p]: the mined negative
    # Mined per block of anchors, [block, p, n] at a time: a batch may be 1,024 rows, and b^3
    # floats would be 4 GB.
    block = max(1, block_elements // (b * b))
    for start in range(0, b, block):
        a = slice(start, min(start + block, b))
        d_an = np.broadcast_to(dist[a, None, :], (a.stop - a.start, b, b))
        outside = neg[a, None, :] & (d_an > dist[a, :, None])
        semi = np.argmin(np.where(outside, d_an, np.inf), axis=2)
        farthest = np.argmax(np.where(neg[a, None, :], d_an, -np.inf), axis=2)
        chosen[a] = np.where(outside.any(axis=2), semi, farthest)
    anchors = np.broadcast_to(np.arange(b)[:, None], (b, b))
    hinge = dist - dist[anchors, chosen] + margin
    weight = pos & np.any(neg, axis=1, keepdims=True)
    n = max(float(weight.sum()), 1.0)
    active = weight & (hinge > 0)
    loss = float(np.where(weight, np.maximum(hinge, 0.0), 0.0).sum() / n)
    g_dist = active / n  # d loss / d dist[a, p]
    np.add.at(g_dist, (anchors[active], chosen[active]), -1.0 / n)  # and / d dist[a, n]
    g_sim = g_dist * np.where(raw > 1e-12, -1.0 / dist, 0.0)  # d dist / d sim = -1 / dist
    return loss, ((g_sim + g_sim.T) @ emb).astype(emb.dtype, copy=False)


def similarity_preservation_np(emb: np.ndarray, x: np.ndarray) -> tuple[float, np.ndarray]:
    """``mean((emb emb^T - x x^T)^2)`` over the batch's pairs, ``x`` the L2-normalised input
    features, and its gradient: the head may move the embedding, but pays for changing how alike
    two images were under the pretrained features (Tung & Mori 2019's similarity-preserving
    distillation). Measured (README, Retrieval quality): on real photos it keeps more of new
    categories' Recall@1 at the same closed-set gain; on the emoji demos it costs closed-set gain,
    hence off by default."""
    diff = emb @ emb.T - x @ x.T
    n2 = float(len(emb) ** 2)
    g_sim = (2.0 / n2) * diff
    return float(np.square(diff).sum() / n2), ((g_sim + g_sim.T) @ emb).astype(emb.dtype, copy=False)


def similarity_preservation(tf, emb, x):
    """:func:`similarity_preservation_np` in TensorFlow (the reference of its gradient's test)."""
    x = tf.math.l2_normalize(x, axis=1)
    diff = tf.matmul(emb, emb, transpose_b=True) - tf.matmul(x, x, transpose_b=True)
    return tf.reduce_mean(tf.square(diff))


NUMPY_METRIC_LOSSES: dict[str, Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]] = {
    "contrastive": contrastive_loss_np,
    "triplet": triplet_semihard_loss_np,
    "multi_similarity": multi_similarity_loss_np,
}
