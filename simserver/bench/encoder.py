"""Encoder speed: the TF SavedModel (the source of truth), the raw float32 TFLite interpreter, the
served float32 TFLite runtime and the served int8 runtime, at batch 1 and 32, measured alternately
in one process so machine noise hits all of them; and, per bundled domain, the runtime its current
version serves (the training's decision, hold-out loss and interval, from its meta.json)."""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from pathlib import Path

import numpy as np

from simserver.bench.common import DEMO_DOMAINS, bench_environment, rate
from simserver.bench.int8 import runtime_row, trained_decisions

logger = logging.getLogger(__name__)

ROUNDS = 5  # interleaved rounds per batch size (see encoder_figures)


def random_images(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    # Content does not change a CNN's speed; random pixels avoid reading files in the timed loop.
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def domain_runtimes(domains: tuple[str, ...] = DEMO_DOMAINS) -> dict[str, dict | None]:
    """Per domain, the ``runtime`` block of its current version's meta.json (None if untrained)."""
    from simserver.repository import Repository
    from simserver.settings import get_settings
    from simserver.store import open_store

    settings = get_settings()
    repo = Repository(open_store(settings.store_uri, settings.store_cache_dir))
    out: dict[str, dict | None] = {}
    for d in domains:
        version = repo.current_version(d)
        meta = repo.load(d, version).meta if version else {}
        out[d] = {"version": version, **runtime_row(meta)} if meta.get("runtime") else None
    return out


def encoder_figures(
    seconds: float = 8.0,
    domains: tuple[str, ...] = DEMO_DOMAINS,
    data: list[Path] | None = None,
    threads: int = 0,
) -> dict:
    """img/s per runtime and batch size (``{"savedmodel": {"batch_1": …, "batch_32": …}, …}``), the
    served int8 over the raw float32 TFLite ratio, the load average, the bundled domains' decisions
    and, per ``data`` folder, the decision of a real training (:mod:`simserver.bench.int8`).
    ``threads``: TFLite threads of every runtime (0: every usable CPU)."""
    bench_environment()
    from simserver.encoder import TFLITE_FILE, Encoder, TFLiteInterpreter, builtin_model_path
    from simserver.encoder_pool import EncoderPool
    from simserver.int8 import int8_name
    from simserver.settings import get_settings

    settings = get_settings()
    served = Encoder("builtin", runtime="tflite", threads=threads)
    raw = TFLiteInterpreter(
        (builtin_model_path(settings.builtin_model)[1].parent / TFLITE_FILE).read_bytes(), served.threads
    )
    int8 = EncoderPool(builtin_model=settings.builtin_model, threads=served.threads).get(int8_name("builtin"))
    runtimes = {
        "savedmodel": Encoder("builtin", runtime="savedmodel").encode,
        "tflite_float32_raw": lambda x: raw(x.astype(np.float32) / 255.0),  # the interpreter alone
        "tflite_float32": served.encode,
        "tflite_int8": int8.encode,
    }
    images = random_images(32)
    load_before = os.getloadavg()
    out: dict = {name: {} for name in runtimes}
    ratios: dict[str, list[float]] = {}
    cpu_ratios: dict[str, list[float]] = {}
    for batch in (1, 32):
        # Short rounds, the runtimes in turn within each round, so that a burst of the machine's other
        # load hits every runtime of a round alike; each round's speed is its median call (a call that
        # the scheduler preempted does not count as the model's speed), the figure the median round.
        per_round: dict[str, list[float]] = {name: [] for name in runtimes}
        per_cpu: dict[str, list[float]] = {name: [] for name in runtimes}
        for _ in range(ROUNDS):
            for name, encode in runtimes.items():
                cpu0 = time.process_time()
                _, times = rate(partial(encode, images[:batch]), batch, seconds / ROUNDS)
                cpu = time.process_time() - cpu0
                per_round[name].append(batch * 1000.0 / float(np.median(times)))
                # Images per CPU second of this process (the warm-up call of `rate` included): what
                # the model costs, which other processes on the machine do not change.
                per_cpu[name].append(batch * (len(times) + 1) / max(cpu, 1e-9))
        key = f"batch_{batch}"
        for name, speeds in per_round.items():
            out[name][key] = round(float(np.median(speeds)), 1)
            out[name][f"{key}_per_cpu_second"] = round(float(np.median(per_cpu[name])), 1)
            logger.info("encoder %s batch %d: %.1f img/s", name, batch, out[name][key])
        # Paired: each round's int8 against the same round's raw float32.
        for into, figures in ((ratios, per_round), (cpu_ratios, per_cpu)):
            pairs = zip(figures["tflite_int8"], figures["tflite_float32_raw"], strict=True)
            into[key] = [i / r for i, r in pairs]
    out["int8_over_raw_float32"] = {b: round(float(np.median(v)), 2) for b, v in ratios.items()}
    out["int8_over_raw_float32_rounds"] = {b: [round(x, 2) for x in v] for b, v in ratios.items()}
    out["int8_over_raw_float32_per_cpu_second"] = {
        b: round(float(np.median(v)), 2) for b, v in cpu_ratios.items()
    }
    out["threads"] = served.threads
    out["load_average"] = {
        "before": [round(v, 2) for v in load_before],
        "after": [round(v, 2) for v in os.getloadavg()],
    }
    out["domains"] = domain_runtimes(domains)
    if data:
        out["data"] = trained_decisions(data)
    return out
