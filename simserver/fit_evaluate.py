"""A training's fit-and-evaluate stage: split, evaluate the pretrained embedding, fine-tune the
head, hold the open set (a similarity-preserving refit, then a raised blend), decide
(:func:`fit_and_evaluate`); and the out-of-fold embeddings relevance calibrates on
(:func:`scored_parts`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from simserver.backend import Backend, Progress, Stage
from simserver.calibration import ScoredPart
from simserver.errors import RequestRefused
from simserver.evaluation import (
    Comparison,
    OpenSplit,
    RetrievalResult,
    Split,
    bootstrap_interval,
    decide,
    evaluate_open_set,
    evaluate_retrieval,
    fold_groups,
    hits_at_1,
    interval_summary,
    open_set_split,
    stratified_split,
    worst_queries,
)
from simserver.features import FeatureCache, view_features
from simserver.finetune import Head, TrainingConfig, blend_weight, reweighted
from simserver.ingest import Sample


@dataclass
class Outcome:
    mode: str
    split: Split
    pretrained: RetrievalResult | None
    finetuned: RetrievalResult | None
    head: Head | None
    promoted: bool
    reason: str
    augmented_views: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    # The training split's augmented views: their features and the dataset index of each one's image.
    views: tuple[np.ndarray, np.ndarray] | None = None
    config: TrainingConfig = field(default_factory=TrainingConfig)
    closed: Comparison | None = None
    open_split: OpenSplit | None = None
    open_set: Comparison | None = None
    # The similarity-preservation weight the served head was fitted with: ``config.preserve``, or
    # ``config.open_set_preserve`` when the open set asked for it (:func:`_preserve_for_open_set`).
    preserve: float = 0.0

    @property
    def blend(self) -> float | None:
        """The blend weight of ``head`` (raised for the open set, see :func:`_raise_blend`); None
        without a blended head."""
        return blend_weight(self.head) if isinstance(self.head, Head) else None

    def _pretrained_summary(self) -> dict | None:
        if self.pretrained is None:
            return None
        if self.closed is not None:
            return interval_summary(self.pretrained, self.closed.pretrained_ci)
        rule = self.config.promotion
        ci = bootstrap_interval(
            hits_at_1(self.pretrained), rule.bootstrap_samples, rule.confidence, self.config.seed
        )
        return interval_summary(self.pretrained, ci)

    def _open_set_summary(self) -> dict | None:
        if self.open_set is None or self.open_split is None:
            return None
        o = self.open_set
        return {
            "held_out_categories": list(self.open_split.held_classes),
            "train_images": len(self.open_split.train),
            "queries": o.finetuned.queries,
            "pretrained": interval_summary(o.pretrained, o.pretrained_ci),
            "finetuned": interval_summary(o.finetuned, o.finetuned_ci),
            "gain": o.gain_summary(),
        }

    def evaluation(self) -> dict:
        return {
            "mode": self.mode,
            "pretrained": self._pretrained_summary(),
            "finetuned": (
                interval_summary(self.finetuned, self.closed.finetuned_ci)
                if self.finetuned and self.closed
                else self.finetuned.summary()
                if self.finetuned
                else None
            ),
            "gain": self.closed.gain_summary() if self.closed else None,
            "open_set": self._open_set_summary(),
            "promotion": self.config.promotion.model_dump(),
            "promoted": self.promoted,
            "reason": self.reason,
            "holdout_images": len(self.split.holdout),
            "train_images": len(self.split.train),
            "augmented_views": self.augmented_views,
            "blend": self.blend,
            "preserve": self.preserve if self.head is not None else None,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }

    def worst_queries(self, samples: list[Sample]) -> list[dict] | None:
        """The served embedding's hold-out queries whose first result has the wrong label
        (:func:`simserver.evaluation.worst_queries`); None without a hold-out evaluation."""
        served = self.finetuned if self.promoted else self.pretrained
        if served is None:
            return None
        ids, labels = [s.id for s in samples], [s.label for s in samples]
        q, g = self.split.holdout.tolist(), self.split.train.tolist()
        return worst_queries(
            served, [ids[i] for i in q], [labels[i] for i in q], [ids[i] for i in g], [labels[i] for i in g]
        )


def fit_and_evaluate(
    samples: list[Sample],
    features: np.ndarray,
    backend: Backend,
    config: TrainingConfig,
    mode: str,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
    pretrained_vectors: np.ndarray | None = None,
    stage: Stage | None = None,
) -> Outcome:
    """Split, evaluate the pretrained embedding, fine-tune (unless told not to), decide.

    ``features`` are what the backend's fit takes and the fitted model's ``apply`` maps;
    ``pretrained_vectors`` the pretrained embedding when that is not ``features`` themselves
    (the tail experiment of ``bench quality``: features are trunk activation maps)."""
    labels = [s.label for s in samples]
    classes = sorted(set(labels))
    split = stratified_split(labels, config.holdout_fraction, config.min_holdout_per_class, config.seed)
    lab = np.asarray(labels)

    def evaluate(vectors: np.ndarray) -> RetrievalResult | None:
        if not split.evaluable:
            return None
        return evaluate_retrieval(
            vectors[split.holdout], lab[split.holdout], vectors[split.train], lab[split.train]
        )

    pre_vectors = features if pretrained_vectors is None else pretrained_vectors
    pretrained = evaluate(pre_vectors)
    out = Outcome(mode, split, pretrained, None, None, False, "", config=config, preserve=config.preserve)
    if mode == "pretrained":
        out.reason = "mode=pretrained: indexed with the domain's pretrained encoder"
        return out
    if len(classes) < 2:
        msg = f"only one category ({classes[0]!r}): fine-tuning needs at least two"
        if mode == "finetune":
            raise RequestRefused(f"mode=finetune: {msg}")
        out.reason = f"{msg}; indexed with the pretrained encoder"
        return out
    if not split.evaluable and mode == "auto":
        out.reason = (
            "no category has two or more images, so there is no hold-out to compare on; indexed with "
            "the pretrained encoder (mode=finetune fine-tunes without an evaluation)"
        )
        return out

    train_idx = split.train if split.evaluable else np.arange(len(samples))
    x, y = features[train_idx], lab[train_idx]
    if config.augment_views and len(samples) <= config.augment_max_images:
        t0 = time.perf_counter()
        vx, owner = view_features(
            [samples[i] for i in train_idx],
            config.augment_views,
            config.seed,
            backend,
            cache,
            batch_size,
            progress,
        )
        x = np.concatenate([x, vx])
        y = np.concatenate([y, y[np.asarray(owner, dtype=np.int64)]])
        out.augmented_views = len(vx)
        out.views = (vx, train_idx[np.asarray(owner, dtype=np.int64)])
        out.seconds["augment"] = time.perf_counter() - t0
    rule = config.promotion
    fit = config
    open_head: Head | None = None
    if split.evaluable and pretrained is not None and rule.open_set:
        # The open set first: when it falls short, it decides how the served head is fitted.
        t0 = time.perf_counter()
        out.open_split, out.open_set, open_head = _open_set(features, pre_vectors, x, y, lab, backend, config)
        if mode == "auto" and open_head is not None:
            fit, open_head = _preserve_for_open_set(out, features, lab, (x, y), backend, open_head, config)
        out.seconds["open_set"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    head = backend.train_head(x, y.tolist(), fit)
    out.seconds["head"] = time.perf_counter() - t0
    if stage:
        stage("evaluating", 0)
    out.head, out.preserve = head, fit.preserve
    out.finetuned = evaluate(head.apply(features))
    if out.finetuned is not None and pretrained is not None:
        out.closed = Comparison.of(
            out.finetuned, pretrained, rule.bootstrap_samples, rule.confidence, config.seed
        )
        if mode == "auto" and open_head is not None:
            t0 = time.perf_counter()
            _raise_blend(out, features, lab, open_head, evaluate, config)
            out.seconds["open_set"] += time.perf_counter() - t0
    if mode == "finetune":
        out.promoted = True
        out.reason = "mode=finetune: fine-tuned encoder promoted without comparison"
        if out.finetuned is None:
            out.reason += " (no hold-out: every category has one image)"
    else:
        assert out.closed is not None
        out.promoted, out.reason = decide(
            out.closed, out.open_set, rule.promote_on, rule.max_open_set_drop, rule.require_interval
        )
    return out


def scored_parts(
    samples: list[Sample],
    features: np.ndarray,
    outcome: Outcome,
    served_vectors: np.ndarray,
    folds: int,
    backend: Backend,
    config: TrainingConfig,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> list[ScoredPart]:
    """Every image, each in an embedding whose head never trained on it, with its augmented views
    (when the training made them) as further queries: what relevance calibrates on.

    Without a promoted head the served embedding trained on no image: one part, every image. With
    one, the served head's hold-out is the first part, and the training split is dealt into
    ``folds - 1`` more, each embedded by a head trained (the same way) on everything else, so every
    image is scored once by a head that did not train on it, as a site image is."""
    n = len(samples)
    lab = np.asarray([s.label for s in samples])
    split = outcome.split
    views = outcome.views  # the training split's; the hold-out's are added when a head needs them
    promoted = outcome.promoted and outcome.head is not None
    if views is not None and split.evaluable and (promoted and folds > 1 or not promoted):
        vx, owner = view_features(
            [samples[i] for i in split.holdout],
            config.augment_views,
            config.seed,
            backend,
            cache,
            batch_size,
            progress,
        )
        views = (
            np.concatenate([views[0], vx]),
            np.concatenate([views[1], split.holdout[np.asarray(owner, np.int64)]]),
        )

    def part(
        indices: np.ndarray, vectors: np.ndarray, embed: Callable[[np.ndarray], np.ndarray]
    ) -> ScoredPart:
        if views is None:
            return ScoredPart(indices, vectors)
        mine = np.isin(views[1], indices)
        return ScoredPart(indices, vectors, embed(views[0][mine]), views[1][mine])

    if not promoted:
        return [part(np.arange(n, dtype=np.int64), served_vectors, lambda x: x)]
    assert outcome.head is not None
    if folds < 2:
        return [part(np.arange(n, dtype=np.int64), served_vectors, outcome.head.apply)]
    parts: list[ScoredPart] = []
    rest = np.arange(n, dtype=np.int64)
    if split.evaluable:
        parts.append(part(split.holdout, served_vectors, outcome.head.apply))
        rest = split.train
    served_blend = outcome.blend
    config = config.model_copy(update={"preserve": outcome.preserve})  # as the served head was fitted
    t0 = time.perf_counter()
    for group in fold_groups(lab, rest, folds - len(parts), config.seed):
        keep = np.setdiff1d(np.arange(n), group)
        x, y = features[keep], lab[keep]
        if views is not None:
            mine = np.isin(views[1], keep)
            x, y = np.concatenate([x, views[0][mine]]), np.concatenate([y, lab[views[1][mine]]])
        if len(set(y.tolist())) < 2:
            continue  # nothing to fit a head on: these images are not scored
        head = backend.train_head(x, y.tolist(), config)
        if served_blend is not None and served_blend != config.blend:
            head = reweighted(head, served_blend)  # as the served head was re-weighted
        parts.append(part(group, head.apply(features), head.apply))
    outcome.seconds["cross_fit"] = time.perf_counter() - t0
    return parts


def _open_set(
    features: np.ndarray,
    pre_vectors: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    lab: np.ndarray,
    backend: Backend,
    config: TrainingConfig,
) -> tuple[OpenSplit | None, Comparison | None, Head | None]:
    """A second head trained without whole categories (the rows of ``x``/``y``, the training rows of
    the promoted head, whose label is not held out), evaluated on those categories' images."""
    split = open_set_split(lab.tolist(), config.promotion.open_set_fraction, config.seed)
    if not split.evaluable:
        return None, None, None
    if len(np.unique(y[~np.isin(y, split.held_classes)])) < 2:
        return None, None, None
    head, fine = _fit_open_set_head(features, x, y, lab, split, backend, config)
    rule = config.promotion
    pre = evaluate_open_set(pre_vectors, lab, split)
    comparison = Comparison.of(fine, pre, rule.bootstrap_samples, rule.confidence, config.seed)
    return split, comparison, head


def _fit_open_set_head(
    features: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    lab: np.ndarray,
    split: OpenSplit,
    backend: Backend,
    config: TrainingConfig,
) -> tuple[Head, RetrievalResult]:
    """A head fitted with ``config`` on the rows of ``x``/``y`` whose category ``split`` does not
    hold out, and its open-set evaluation."""
    keep = ~np.isin(y, split.held_classes)
    head = backend.train_head(x[keep], y[keep].tolist(), config)
    return head, evaluate_open_set(head.apply(features), lab, split)


def _preserve_for_open_set(
    out: Outcome,
    features: np.ndarray,
    lab: np.ndarray,
    rows: tuple[np.ndarray, np.ndarray],
    backend: Backend,
    open_head: Head,
    config: TrainingConfig,
) -> tuple[TrainingConfig, Head]:
    """The first way to hold the open set (``mode=auto``): when its Recall@1 falls more than
    ``max_open_set_drop`` below pretrained, the open-set head is refitted with similarity
    preservation ``open_set_preserve`` and, if the open set gains, the served head is fitted with
    it too. Preservation keeps the pretrained neighbourhoods inside the head: on furniture it held
    the open set with 2 points more closed-set gain than raising the blend did (README, quality
    table). One more fit (~0.3-0.6 s in NumPy); the blend (:func:`_raise_blend`) comes second.
    Returns the served head's config and the open-set head."""
    rule = config.promotion
    if (
        out.open_set is None
        or out.open_split is None
        or rule.max_open_set_drop is None
        or config.open_set_preserve <= config.preserve
        or not out.open_set.falls_short(rule.max_open_set_drop)
    ):
        return config, open_head
    refit = config.model_copy(update={"preserve": config.open_set_preserve})
    candidate, fine = _fit_open_set_head(features, *rows, lab, out.open_split, backend, refit)
    if fine.recall_at_1 <= out.open_set.finetuned.recall_at_1:
        return config, open_head
    out.open_set = Comparison.of(
        fine, out.open_set.pretrained, rule.bootstrap_samples, rule.confidence, config.seed
    )
    return refit, candidate


def _raise_blend(
    out: Outcome,
    features: np.ndarray,
    lab: np.ndarray,
    open_head: Head,
    evaluate: Callable[[np.ndarray], RetrievalResult | None],
    config: TrainingConfig,
) -> None:
    """The second way to hold the open set (``mode=auto``): while its Recall@1 falls more than
    ``max_open_set_drop`` below pretrained, double the blend weight of both heads (the served one
    and the open-set one), up to ``blend_max``: the embedding moves towards the pretrained one,
    which new categories need, and the closed-set gain is re-measured at that weight. No refit, so
    it costs a few evaluations. Both this and :func:`_preserve_for_open_set` are chosen on the
    open-set split, so that check is no longer independent of the choice: the closed-set gain,
    which the promotion rests on, is."""
    rule = config.promotion
    weight = out.blend
    if weight is None or out.head is None or rule.max_open_set_drop is None or out.open_split is None:
        return
    assert out.open_set is not None and out.pretrained is not None
    while out.open_set.falls_short(rule.max_open_set_drop) and weight * 2 <= config.blend_max + 1e-9:
        weight *= 2
        fine = evaluate_open_set(reweighted(open_head, weight).apply(features), lab, out.open_split)
        out.open_set = Comparison.of(
            fine, out.open_set.pretrained, rule.bootstrap_samples, rule.confidence, config.seed
        )
        out.head = reweighted(out.head, weight)
        out.finetuned = evaluate(out.head.apply(features))
        assert out.finetuned is not None
        out.closed = Comparison.of(
            out.finetuned, out.pretrained, rule.bootstrap_samples, rule.confidence, config.seed
        )
