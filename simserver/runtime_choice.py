"""Which runtime a domain's new version serves: float32 or int8, decided on its own hold-out.

``encoder_runtime`` in ``domains/<name>.yaml``:

* ``mode: auto`` (default): the training evaluates the int8 runtime of the promoted encoder on the
  same hold-out as the float32 one and serves int8 when its loss is within ``int8_max_loss``
  (:func:`choose`); ``mode: float32``: always float32 (int8 is not built nor evaluated).
* ``int8_max_loss`` (default 0.01, one point): the most Recall@1 and mAP@R may drop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from simserver.evaluation import RetrievalResult, bootstrap_interval, hits_at_1

if TYPE_CHECKING:  # the training imports the domain config, which imports this module
    from simserver.backend import Backend
    from simserver.domain_config import DomainConfig
    from simserver.features import FeatureCache
    from simserver.fit_evaluate import Outcome
    from simserver.ingest import Sample
    from simserver.training import Promotion

Runtime = Literal["float32", "int8"]


class EncoderRuntimeConfig(BaseModel):
    """``encoder_runtime:`` in ``domains/<name>.yaml``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["auto", "float32"] = Field(
        "auto", description="auto: int8 when its hold-out loss is within int8_max_loss; float32: never int8"
    )
    int8_max_loss: float = Field(
        0.01,
        ge=0,
        le=1,
        description="the most hold-out Recall@1 (upper end of its bootstrap interval) and mAP@R may drop",
    )


@dataclass(frozen=True)
class RuntimeDecision:
    runtime: Runtime
    reason: str
    float32: RetrievalResult | None = None
    int8: RetrievalResult | None = None
    # float32 minus int8 (positive: int8 is worse); the Recall@1 loss's interval is paired per query.
    recall_at_1_loss: float | None = None
    recall_at_1_loss_ci: tuple[float, float] | None = None
    map_at_r_loss: float | None = None
    img_per_s: dict[str, float] | None = None  # each runtime's speed as the training measured it
    seconds: float = 0.0  # what the int8 runtime added to the training

    def summary(self, max_loss: float) -> dict:
        def side(r: RetrievalResult | None) -> dict | None:
            if r is None:
                return None
            return {
                "recall_at_1": round(r.recall_at_1, 4),
                "map_at_r": round(r.map_at_r, 4),
                "queries": r.queries,
            }

        return {
            "runtime": self.runtime,
            "reason": self.reason,
            "int8_max_loss": max_loss,
            "float32": side(self.float32),
            "int8": side(self.int8),
            "recall_at_1_loss": None if self.recall_at_1_loss is None else round(self.recall_at_1_loss, 4),
            "recall_at_1_loss_ci": (
                None if self.recall_at_1_loss_ci is None else [round(v, 4) for v in self.recall_at_1_loss_ci]
            ),
            "map_at_r_loss": None if self.map_at_r_loss is None else round(self.map_at_r_loss, 4),
            "img_per_s": self.img_per_s,
            "seconds": round(self.seconds, 3),
        }


def choose(
    float32: RetrievalResult,
    int8: RetrievalResult,
    max_loss: float,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> RuntimeDecision:
    """int8 when the upper end of the bootstrap interval of its paired Recall@1 loss (per-query
    hit differences on the same hold-out queries) and its mAP@R loss are both at most ``max_loss``:
    int8 must be shown not to lose more, not merely not be shown to lose more."""
    diff = hits_at_1(float32) - hits_at_1(int8)
    loss = float(diff.mean())
    lo, hi = bootstrap_interval(diff, samples, confidence, seed)
    map_loss = float32.map_at_r - int8.map_at_r
    what = (
        f"hold-out Recall@1 {int8.recall_at_1:.3f} int8 vs {float32.recall_at_1:.3f} float32 "
        f"(loss {loss:+.3f}, interval [{lo:+.3f}, {hi:+.3f}], {int8.queries} queries), "
        f"mAP@R {int8.map_at_r:.3f} vs {float32.map_at_r:.3f}"
    )
    eps = 1e-9
    if hi > max_loss + eps:
        runtime: Runtime = "float32"
        reason = f"float32: {what}: the Recall@1 loss's interval reaches above {max_loss:.3f}"
    elif map_loss > max_loss + eps:
        runtime = "float32"
        reason = f"float32: {what}: mAP@R loses more than {max_loss:.3f}"
    else:
        runtime = "int8"
        reason = f"int8: {what}: within {max_loss:.3f}"
    return RuntimeDecision(runtime, reason, float32, int8, loss, (lo, hi), float(map_loss))


def hit_flips(float32: RetrievalResult, int8: RetrievalResult) -> tuple[int, int]:
    """(queries int8 gets wrong that float32 gets right, the reverse): for reports."""
    f, i = hits_at_1(float32), hits_at_1(int8)
    return int(np.sum((f == 1) & (i == 0))), int(np.sum((f == 0) & (i == 1)))


# -- at a training: build, evaluate, decide ---------------------------------------------------------
SPEED_BATCH = 8  # images each runtime encodes (twice) to report its speed in the training


def _img_per_s(encode: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> float:
    best = float("inf")
    for _ in range(2):  # the better of two: a training shares the machine
        t = time.perf_counter()
        encode(images)
        best = min(best, time.perf_counter() - t)
    return round(len(images) / best, 1)


def served_runtime(
    cfg: DomainConfig,
    samples: list[Sample],
    outcome: Outcome,
    served: Promotion,
    features: np.ndarray,
    backend: Backend,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
) -> tuple[Promotion, np.ndarray, RuntimeDecision]:
    """The runtime the new version serves, with its vectors of every image and the backbone
    features they come from (what calibration then uses): the float32 ones given, or the int8
    runtime's when it is within ``int8_max_loss`` on the hold-out (``encoder_runtime``).

    The int8 runtime of the served encoder is the int8 backbone (:mod:`simserver.int8`, built once
    per backbone) plus, for a fine-tuned encoder, its head in float32; its vectors of every image
    are computed here (a version never mixes runtimes), cached by content like the float32 ones."""
    from simserver.builder import decode_batch
    from simserver.evaluation import evaluate_retrieval
    from simserver.features import backbone_features
    from simserver.int8 import int8_name
    from simserver.training import Promotion

    t0 = time.perf_counter()
    rule = cfg.encoder_runtime
    maybe: Callable[[np.ndarray, str], np.ndarray] | None = getattr(backend, "encode_with", None)
    if rule.mode == "float32":
        return served, features, RuntimeDecision("float32", "encoder_runtime.mode=float32")
    if maybe is None:
        why = "float32: this training backend has no int8 runtime"
        return served, features, RuntimeDecision("float32", why)
    encode_with = maybe
    split = outcome.split
    if not split.evaluable:
        why = "float32: no hold-out (every category has one image) to evaluate int8 on"
        return served, features, RuntimeDecision("float32", why)
    backbone8 = int8_name(backend.encoder)
    int8_id = f"{backend.encoder_id}+int8"

    class Int8Backbone:
        encoder, encoder_id = backbone8, int8_id

        def encode(self, images: np.ndarray) -> np.ndarray:
            return encode_with(images, backbone8)

    int8_cache = cache.sibling(int8_id) if cache else None
    features8 = backbone_features(samples, cast("Backend", Int8Backbone()), int8_cache, batch_size)
    head = outcome.head if outcome.promoted else None
    vectors8 = head.apply(features8) if head is not None else features8
    lab = np.asarray([s.label for s in samples])

    def evaluate(v: np.ndarray) -> RetrievalResult:
        return evaluate_retrieval(v[split.holdout], lab[split.holdout], v[split.train], lab[split.train])

    p = cfg.training.promotion
    decision = choose(
        evaluate(served.vectors), evaluate(vectors8), rule.int8_max_loss, p.bootstrap_samples, p.confidence
    )
    # The backbones' speed: a fine-tuned encoder adds the same NumPy head to both runtimes (and
    # timing the backbones needs no second load of a fine-tuned SavedModel here).
    probe = decode_batch(samples[:SPEED_BATCH])
    speed = {
        "float32": _img_per_s(backend.encode, probe),
        "int8": _img_per_s(lambda x: encode_with(x, backbone8), probe),
    }
    decision = replace(decision, img_per_s=speed, seconds=time.perf_counter() - t0)
    if decision.runtime == "float32":
        return served, features, decision
    return Promotion(int8_name(served.encoder), f"{served.encoder_id}+int8", vectors8), features8, decision
