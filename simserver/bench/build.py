"""Domain builds side by side on the same images: the local build (one process) and the Ray build
(:mod:`simserver.distributed`) with 1, 2, … encoder actors, each into an empty store, with the load
average next to every figure (the machine is shared: only ratios within one run compare).

Images/s is indexed images over the whole build (listing, decoding, encoding, storing, index,
publish); the Ray figures also split off the encoding phase, which is what more actors speed up,
from the serial rest the driver does (list, read shards, index, publish): the slope for N machines
follows from the two (Amdahl).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from simserver.bench.common import bench_environment

logger = logging.getLogger(__name__)


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (MIT)


def _idx(path: Path) -> np.ndarray:
    """An MNIST ``idx`` file (gzipped): big-endian dimensions after a magic number, then uint8s."""
    import gzip

    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of Fashion-MNIST: a ``.npz`` (``x``, ``y``) or Debian's folder (the 10k test
    set, then the 60k training set)."""
    if source.suffix == ".npz":
        data = np.load(source)
        return data["x"], data["y"]
    x = [_idx(source / f"{s}-images-idx3-ubyte.gz") for s in ("t10k", "train")]
    y = [_idx(source / f"{s}-labels-idx1-ubyte.gz") for s in ("t10k", "train")]
    return np.concatenate(x), np.concatenate(y)


def write_fashion_mnist(source: Path, n: int, out: Path) -> Path:
    """The first ``n`` Fashion-MNIST product photos as ``class-<label>/<i>.png`` under ``out``."""
    from PIL import Image

    x, y = fashion_mnist(source)
    if len(x) < n:
        raise ValueError(f"{source} holds {len(x)} images, fewer than {n}")
    for i in range(n):
        folder = out / f"class-{int(y[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(folder / f"{i:06d}.png")
    return out


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def build_figures(data: Path, workers: list[int], shard_size: int = 250, local: bool = True) -> dict:
    bench_environment()
    import ray

    from simserver.distributed import RayOptions, build_on_ray, start_ray
    from simserver.domain_config import DomainConfig, Limits
    from simserver.encoder_pool import EncoderPool, LocalBackend
    from simserver.ingest import read_folder
    from simserver.repository import Repository
    from simserver.settings import get_settings
    from simserver.store import LocalStore
    from simserver.training import train_domain

    many = 10_000_000
    cfg = DomainConfig(
        name="bench-build",
        limits=Limits(max_entries=many, max_upload_bytes=2**40, max_uncompressed_bytes=2**40),
    )
    out: dict = {"images": None, "cpus": os.cpu_count(), "shard_size": shard_size, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        if local:
            pool = EncoderPool.from_settings(get_settings())
            backend = LocalBackend(pool, cfg.encoder)  # the encoder load is not part of the build's time
            load0, t0 = _load(), time.perf_counter()
            dataset = read_folder(data, cfg.limits)
            report = train_domain(
                Repository(LocalStore(Path(tmp) / "local")),
                cfg,
                dataset,
                backend,
                mode="pretrained",
                started=t0,
            )
            seconds = time.perf_counter() - t0
            out["images"] = report.indexed
            out["runs"]["local"] = {
                "seconds": round(seconds, 1),
                "img_per_s": round(report.indexed / seconds, 1),
                "load_before_after": [load0, _load()],
            }
            logger.info("local: %d images in %.1f s", report.indexed, seconds)
            del pool, backend
        # Ray runs its workers at nice 15 (they yield to anything else on the machine, a server
        # too); here they must compete on equal terms with the local build, which runs at nice 0.
        os.environ["RAY_worker_niceness"] = "0"
        start_ray(None, num_cpus=max(workers))
        try:
            for w in workers:
                store = Path(tmp) / f"ray-{w}"
                load0, t0 = _load(), time.perf_counter()
                report = build_on_ray(
                    Repository(LocalStore(store)),
                    cfg,
                    str(data),
                    f"file://{store}",
                    RayOptions(workers=w, shard_size=shard_size),
                )
                seconds = time.perf_counter() - t0
                encode = report.meta["build"]["encode_seconds"]
                out["images"] = report.indexed
                out["runs"][f"ray_{w}_workers"] = {
                    "seconds": round(seconds, 1),
                    "img_per_s": round(report.indexed / seconds, 1),
                    "encode_phase_s": round(encode, 1),
                    "encode_img_per_s": round(report.indexed / encode, 1),
                    "serial_s": round(seconds - encode, 1),
                    "load_before_after": [load0, _load()],
                }
                logger.info("ray, %d workers: %.1f s (encoding %.1f s)", w, seconds, encode)
        finally:
            ray.shutdown()
    runs = out["runs"]
    if len(workers) > 1:
        a, b = runs[f"ray_{workers[0]}_workers"], runs[f"ray_{workers[-1]}_workers"]
        out["encode_speedup"] = round(a["encode_phase_s"] / b["encode_phase_s"], 2)
        out["encode_speedup_ideal"] = round(workers[-1] / workers[0], 2)
    if "local" in runs and workers:
        out["ray_over_local"] = {
            k: round(v["img_per_s"] / runs["local"]["img_per_s"], 2) for k, v in runs.items() if k != "local"
        }
    out["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    return out
