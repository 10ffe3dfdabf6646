"""Retrieval quality of the training methods on real labelled photos (``simserver bench quality``).

For each ``--data`` folder of ``<category>/<image>``: the images are encoded once with the
domain's encoder (timed: "one encoding pass", decode included, no feature cache), then each method
runs the training pipeline's fit-and-evaluate stage (:func:`simserver.fit_evaluate.fit_and_evaluate`)
on the same features and the same splits:

* ``pretrained``: the encoder as it is;
* ``head-only``: the fine-tuning as it was before issue 18 (a head on pooled features, plus
  ``augment_views`` pixel-augmented copies of each training image for sets up to 500 images);
* ``new``: the default training of this version (see README, "Fine-tuning and evaluation");
* ``preserve``: ``new`` with ``training.preserve: 4`` (similarity preservation, off by default);
* ``blend-only`` (experiment): ``new`` with ``training.open_set_preserve: 0``: the open set held
  by the blend alone, the default before similarity preservation was tried first (2026-12-04);
* ``tail`` (experiment, built-in encoder only, not served): :mod:`simserver.tail`, the last MBConv
  block + conv_head + GeM + head fine-tuned on cached trunk activations; its trunk pass runs on TF
  (Keras), so its seconds are reported against this method's own trunk pass too.

Reported per method: closed-set (stratified hold-out) and open-set (whole categories held out)
Recall@1 with its bootstrap interval, Recall@5 and mAP@R, the paired gain over pretrained with its
interval, and the training seconds (encoding pass + augmented views + fits) as a multiple of the
encoding pass. The export of the SavedModel (~1 s, see ``bench training``) is not included.

One split is one draw of a few dozen queries; ``splits`` > 1 also reports, per method, the mean
closed- and open-set Recall@1 (fine-tuned and pretrained) over that many split seeds (0, 1, ...):
the figure to compare methods by.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from simserver.bench.common import bench_environment

logger = logging.getLogger(__name__)

# TrainingConfig overrides per method, on top of the domain's training section.
HEAD_ONLY = {"augment_views": 2, "epochs": 30, "blend": 0.0, "preserve": 0.0, "open_set_preserve": 0.0}
EXPERIMENTS = ("tail", "preserve", "blend-only")  # run only when asked for (--methods)
METHODS: dict[str, dict] = {
    "pretrained": {},
    "head-only": HEAD_ONLY,
    "new": {"augment_views": 0, "blend": 1.0},
    "preserve": {"augment_views": 0, "blend": 1.0, "preserve": 4.0},  # new + similarity preservation
    "blend-only": {"augment_views": 0, "blend": 1.0, "open_set_preserve": 0.0},
    "tail": {},
}


def _side(result, ci) -> dict:
    return {
        "recall_at_1": round(result.recall_at_1, 4),
        "recall_at_1_ci": [round(v, 4) for v in ci],
        "recall_at_5": round(result.recall_at_5, 4),
        "map_at_r": round(result.map_at_r, 4),
        "queries": result.queries,
    }


def _split_means(samples, features, backend, config, batch_size: int, splits: int) -> dict:
    """Mean Recall@1 of ``config``'s training (mode auto) over split seeds 0 .. splits - 1."""
    from simserver.fit_evaluate import fit_and_evaluate

    rows = []
    for seed in range(splits):
        outcome = fit_and_evaluate(
            samples, features, backend, config.model_copy(update={"seed": seed}), "auto", None, batch_size
        )
        c, o = outcome.closed, outcome.open_set
        assert c is not None
        rows.append(
            [
                c.pretrained.recall_at_1,
                c.finetuned.recall_at_1,
                o.pretrained.recall_at_1 if o else np.nan,
                o.finetuned.recall_at_1 if o else np.nan,
            ]
        )
    m = np.nanmean(np.asarray(rows, np.float64), axis=0)
    return {
        "splits": splits,
        "closed_pretrained": round(float(m[0]), 4),
        "closed_finetuned": round(float(m[1]), 4),
        "closed_gain": round(float(m[1] - m[0]), 4),
        "open_pretrained": round(float(m[2]), 4),
        "open_finetuned": round(float(m[3]), 4),
        "open_gain": round(float(m[3] - m[2]), 4),
    }


def quality_figures(
    data: list[Path],
    domain: str = "food",
    holdout: float = 0.3,
    methods: list[str] | None = None,
    splits: int = 1,
) -> dict:
    bench_environment()
    from simserver.domain_config import load_domains
    from simserver.encoder_pool import EncoderPool, LocalBackend
    from simserver.features import backbone_features
    from simserver.fit_evaluate import fit_and_evaluate
    from simserver.ingest import read_folder
    from simserver.settings import get_settings

    settings = get_settings()
    cfg = load_domains(settings.domains_dir)[domain]
    pool = EncoderPool.from_settings(settings)
    backend = LocalBackend(pool, cfg.encoder)
    backend.encode(np.zeros((2, 224, 224, 3), np.uint8))  # warm-up: not part of any timing
    _trunk: dict = {}
    out: dict = {"domain_config": domain, "holdout_fraction": holdout, "sets": {}}
    for folder in data:
        t0 = time.perf_counter()
        dataset = read_folder(folder, cfg.limits)
        samples = dataset.samples
        features = backbone_features(samples, backend, None, settings.encode_batch_size)
        encode_s = time.perf_counter() - t0
        labels = [s.label for s in samples]
        entry: dict = {
            "images": len(samples),
            "categories": len(set(labels)),
            "encode_seconds": round(encode_s, 2),
            "methods": {},
        }
        logger.info("%s: %d images, encoded in %.1f s", folder, len(samples), encode_s)
        for name in methods or [m for m in METHODS if m not in EXPERIMENTS]:
            if name == "tail":
                entry["methods"][name] = _tail_row(samples, cfg.training, holdout, encode_s, _trunk)
                continue
            overrides = {"holdout_fraction": holdout, **METHODS[name]}
            config = cfg.training.model_copy(update=overrides)
            config = type(config).model_validate(config.model_dump())
            mode = "pretrained" if name == "pretrained" else "auto"
            t = time.perf_counter()
            outcome = fit_and_evaluate(
                samples, features, backend, config, mode, None, settings.encode_batch_size
            )
            fit_s = time.perf_counter() - t
            open_s = outcome.seconds.get("open_set", 0.0)
            train_s = encode_s + fit_s - open_s
            ev = outcome.evaluation()
            row: dict = {"train_seconds": round(train_s, 2), "train_x_encode": round(train_s / encode_s, 2)}
            if name == "pretrained":
                row["closed_set"] = ev["pretrained"]
            else:
                assert outcome.closed is not None
                c = outcome.closed
                row["closed_set"] = _side(c.finetuned, c.finetuned_ci)
                row["closed_set"]["gain"] = c.gain_summary()
                row["open_set_seconds"] = round(open_s, 2)
                # A real training fits the open-set head too: its seconds with them.
                row["train_x_encode_with_open_set"] = round((train_s + open_s) / encode_s, 2)
                row["blend"] = outcome.blend
                row["preserve"] = outcome.preserve
                row["promoted"], row["reason"] = outcome.promoted, outcome.reason
                if outcome.open_set is not None:
                    o = outcome.open_set
                    row["open_set"] = _side(o.finetuned, o.finetuned_ci)
                    row["open_set"]["gain"] = o.gain_summary()
                    pre = entry["methods"].get("pretrained")
                    if pre is not None and "open_set" not in pre:
                        pre["open_set"] = _side(o.pretrained, o.pretrained_ci)
                    entry["open_set_categories"] = list(outcome.open_split.held_classes)  # type: ignore[union-attr]
            if splits > 1 and name != "pretrained":
                row["split_means"] = _split_means(
                    samples, features, backend, config, settings.encode_batch_size, splits
                )
            entry["methods"][name] = row
            logger.info("%s %s: %s", folder.name, name, row["closed_set"]["recall_at_1"])
        out["sets"][folder.name] = entry
    return out


def _tail_row(samples: list, training, holdout: float, encode_s: float, memo: dict) -> dict:
    """The ``tail`` experiment on one set (see the module docstring)."""
    import tf_keras as keras

    from simserver.effnet_port import BLOCKS, build_keras_models, weights_path
    from simserver.fit_evaluate import fit_and_evaluate
    from simserver.tail import TailConfig, pretrained_tail, train_tail
    from simserver.torch_pickle import load_state_dict

    tail_cfg = TailConfig()
    if "trunk" not in memo:
        state = load_state_dict(weights_path())
        features_model, _, outputs = build_keras_models(state)
        memo["trunk"] = keras.Model(features_model.inputs, outputs[BLOCKS - 1 - tail_cfg.blocks])
        memo["base"] = pretrained_tail(state, tail_cfg.blocks)
    trunk, base = memo["trunk"], memo["base"]
    t = time.perf_counter()
    pixels = np.stack([s.pixels for s in samples]).astype(np.float32) / 255.0
    maps = trunk.predict(pixels, batch_size=32, verbose=0).reshape(len(samples), -1)
    trunk_s = time.perf_counter() - t

    class TailBackend:
        def train_head(self, features, labels, config):
            return train_tail(features, labels, config, base, tail_cfg)

    config = type(training).model_validate(
        # open_set_preserve 0: the tail's fit has no similarity-preservation term to refit with
        {**training.model_dump(), "holdout_fraction": holdout, "augment_views": 0, "open_set_preserve": 0.0}
    )
    t = time.perf_counter()
    outcome = fit_and_evaluate(
        samples,
        maps,
        TailBackend(),  # type: ignore[arg-type]  # only the fit: no encoding, no export
        config,
        "auto",
        pretrained_vectors=base.apply(maps),
    )
    fit_s = time.perf_counter() - t - outcome.seconds.get("open_set", 0.0)
    assert outcome.closed is not None
    c = outcome.closed
    row: dict = {
        "trunk_seconds_tf": round(trunk_s, 2),
        "fit_seconds": round(fit_s, 2),
        "train_seconds": round(encode_s + fit_s, 2),
        "train_x_encode": round((encode_s + fit_s) / encode_s, 2),
        "closed_set": {**_side(c.finetuned, c.finetuned_ci), "gain": c.gain_summary()},
        "promoted": outcome.promoted,
        "reason": outcome.reason,
    }
    if outcome.open_set is not None:
        o = outcome.open_set
        row["open_set"] = {**_side(o.finetuned, o.finetuned_ci), "gain": o.gain_summary()}
    return row


def print_quality(result: dict) -> None:
    """One line per set and method, as the README's table shows them."""
    print(
        "set | method | closed R@1 [95% CI] | R@5 | mAP@R | open R@1 [95% CI] | open mAP@R | train s (x enc.)"
    )

    def cell(side: dict | None) -> str:
        if not side:
            return "-"
        lo, hi = side["recall_at_1_ci"]
        return f"{side['recall_at_1']:.3f} [{lo:.3f}, {hi:.3f}]"

    for name, entry in result["sets"].items():
        for method, row in entry["methods"].items():
            c, o = row["closed_set"], row.get("open_set")
            print(
                f"{name} ({entry['images']} img, {entry['categories']} cat) | {method} | {cell(c)} | "
                f"{c['recall_at_5']:.3f} | {c['map_at_r']:.3f} | {cell(o)} | "
                f"{o['map_at_r'] if o else '-'} | {row['train_seconds']} ({row['train_x_encode']}x)"
            )
    means = [
        (name, method, row["split_means"])
        for name, entry in result["sets"].items()
        for method, row in entry["methods"].items()
        if "split_means" in row
    ]
    if means:
        print("set | method | splits | closed R@1 pretrained -> fine-tuned (gain) | open R@1 (gain), means")
        for name, method, m in means:
            print(
                f"{name} | {method} | {m['splits']} | {m['closed_pretrained']:.3f} -> "
                f"{m['closed_finetuned']:.3f} ({m['closed_gain']:+.3f}) | {m['open_pretrained']:.3f} -> "
                f"{m['open_finetuned']:.3f} ({m['open_gain']:+.3f})"
            )
