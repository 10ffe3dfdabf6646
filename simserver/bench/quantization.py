"""The int8 study: is a fully int8-quantized TFLite encoder worth serving?

The rule: int8 only if hold-out Recall@1 drops by at most 1 point. This converts the built-in
encoder with full-integer quantization (activation ranges calibrated on 100 training-split demo
photos), then measures side by side against the float32 TFLite model the server runs:

* img/s at batch 1 with every CPU, alternating the two models (same machine noise for both);
* per-image cosine of int8 vectors against float32 ones, on every demo photo;
* hold-out Recall@1 of the pretrained embedding on each demo domain (the training's stratified
  split: hold-out images query the rest), float32 against int8; and, for context, leave-one-out
  Recall@1 (every image queries all the others: more queries than the hold-out's 17-77).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from simserver.bench.common import DEMO, DEMO_DOMAINS, bench_environment

logger = logging.getLogger(__name__)

Interpreter = Callable[[np.ndarray], np.ndarray]


def _encode(interp: Interpreter, pixels: np.ndarray) -> np.ndarray:
    from simserver.metrics import l2_normalize

    return l2_normalize(interp(pixels.astype(np.float32) / 255.0))


def _img_per_s(interp: Interpreter, image: np.ndarray, seconds: float) -> float:
    x = image[None].astype(np.float32) / 255.0
    interp(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        interp(x)
        n += 1
    return n / (time.perf_counter() - t0)


def quantization_figures(seconds: float = 4.0, rounds: int = 2) -> dict:
    """The figures and the decision (``adopt_int8``, ``why``)."""
    bench_environment()
    import tensorflow as tf

    from simserver.cpu import usable_cpus
    from simserver.domain_config import Limits
    from simserver.encoder import TFLITE_FILE, TFLiteInterpreter, builtin_model_path, convert_tflite
    from simserver.evaluation import evaluate_retrieval, stratified_split
    from simserver.ingest import read_folder
    from simserver.settings import get_settings

    _, saved_model = builtin_model_path(get_settings().builtin_model)
    data = {d: read_folder(DEMO / d, Limits()).samples for d in DEMO_DOMAINS}
    splits = {d: stratified_split([s.label for s in samples]) for d, samples in data.items()}
    calibration = [data[d][i].pixels for d in DEMO_DOMAINS for i in splits[d].train]
    calibration = [calibration[i] for i in np.random.default_rng(0).permutation(len(calibration))[:100]]

    def representative():
        for pixels in calibration:
            yield [pixels[None].astype(np.float32) / 255.0]

    t0 = time.perf_counter()
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    int8_model = converter.convert()
    convert_s = time.perf_counter() - t0
    shipped = saved_model.parent / TFLITE_FILE  # models built before it shipped lack it
    fp32_model = shipped.read_bytes() if shipped.is_file() else convert_tflite(saved_model)
    threads = usable_cpus()
    models = {
        "float32": TFLiteInterpreter(fp32_model, threads),
        "int8": TFLiteInterpreter(int8_model, threads),
    }

    speed: dict[str, list[float]] = {name: [] for name in models}
    probe = calibration[0]
    for _ in range(rounds):
        for name, interp in models.items():
            speed[name].append(_img_per_s(interp, probe, seconds))

    cosines = []
    recall: dict[str, dict[str, float]] = {}
    for d, samples in data.items():
        pixels = np.stack([s.pixels for s in samples])
        labels = np.asarray([s.label for s in samples])
        split = splits[d]
        vecs = {name: _encode(interp, pixels) for name, interp in models.items()}
        cosines.append(np.sum(vecs["float32"] * vecs["int8"], axis=1))
        recall[d] = {
            name: evaluate_retrieval(
                v[split.holdout], labels[split.holdout], v[split.train], labels[split.train]
            ).recall_at_1
            for name, v in vecs.items()
        }
        recall[d]["drop_points"] = 100 * (recall[d]["float32"] - recall[d]["int8"])
        # A larger sample than the hold-out (every image queries all others), for context only:
        # the rule is the hold-out.
        for name, v in vecs.items():
            sims = v @ v.T
            np.fill_diagonal(sims, -np.inf)
            recall[d][f"leave_one_out_{name}"] = float(np.mean(labels[sims.argmax(1)] == labels))
    cos = np.concatenate(cosines)
    worst_drop = max(r["drop_points"] for r in recall.values())
    fp32_speed, int8_speed = (float(np.mean(speed[n])) for n in ("float32", "int8"))
    faster = int8_speed > 1.05 * fp32_speed
    reasons = [
        reason
        for reason, bad in (
            (f"int8 is not faster ({int8_speed:.0f} vs {fp32_speed:.0f} img/s)", not faster),
            (f"Recall@1 drops by up to {worst_drop:.1f} points (limit 1)", worst_drop > 1.0),
        )
        if bad
    ]
    return {
        "threads": threads,
        "convert_s": round(convert_s, 1),
        "model_kb": {"float32": len(fp32_model) // 1024, "int8": len(int8_model) // 1024},
        "img_per_s_batch_1": {"float32": round(fp32_speed, 1), "int8": round(int8_speed, 1)},
        "cosine_int8_vs_float32": {
            "min": round(float(cos.min()), 4),
            "mean": round(float(cos.mean()), 4),
            "images": len(cos),
        },
        "holdout_recall_at_1": {
            d: {k: round(v, 4) if k != "drop_points" else round(v, 2) for k, v in r.items()}
            for d, r in recall.items()
        },
        "worst_recall_at_1_drop_points": round(worst_drop, 2),
        "adopt_int8": not reasons,
        "why": "; ".join(reasons) or "int8 is faster and loses at most 1 point of Recall@1",
    }
