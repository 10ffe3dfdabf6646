"""Loaded encoders by name (a domain's or version's ``encoder``), including fine-tuned ones kept
in the artifact store.

Encoders: ``builtin``, a TF Hub handle or a local SavedModel folder (see :mod:`simserver.encoder`),
or ``store:<key>``: a fine-tuned encoder (backbone + head SavedModel, as a tar) that a training
wrote into the artifact store next to its index version. Store encoders are fetched once into the
local cache and loaded through the same ``tensorflow_hub`` loader; the pool keeps the most
recently used few of them.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import logging
import os
import re
import shutil
import tarfile
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simserver.encoder import Encoder, check_reproduces, load_npy, npy_bytes, probe_images
from simserver.finetune import Head, TrainingConfig, export_finetuned, load_head, train_head, write_head_files
from simserver.int8 import Int8Encoder, float_name, int8_name, is_int8
from simserver.store import ArtifactStore

logger = logging.getLogger(__name__)

STORE_PREFIX = "store:"
# The exported SavedModel's vectors of probe_images(), written by the export beside the head: the
# composed runtime's self-check compares against them without loading the SavedModel (nor TF).
REFERENCE_FILE = "reference.npy"
ENCODER_KEY = re.compile(r"^domains/[a-z0-9][a-z0-9-]{0,62}/versions/[A-Za-z0-9-]{1,64}/encoder\.tar$")


def is_store_encoder(encoder: str) -> bool:
    return float_name(encoder).startswith(STORE_PREFIX)


class FinetunedEncoder:
    """A fine-tuned encoder: its SavedModel is the truth; when the backbone already runs on a fast
    runtime, queries run as backbone (fast) + head (NumPy) after checking that this reproduces the
    SavedModel (cosine >= 0.999), which avoids converting a second copy of the backbone. The check
    compares with the SavedModel's vectors of the probe images that the export stored beside it
    (``reference.npy``), so the SavedModel is not loaded; an encoder exported before that, or one
    that fails the check, loads its SavedModel (and TF) and is checked against it."""

    def __init__(
        self,
        folder: Path,
        encoder: str,
        backbone: Encoder | Int8Encoder | FinetunedEncoder | None,
        loaded: tuple[Head, dict] | None,
    ) -> None:
        """``loaded``: :func:`load_head` of ``folder`` (None for a SavedModel without a head file)."""
        info = loaded[1] if loaded else {}
        self.name = encoder
        if isinstance(backbone, Int8Encoder):
            # The int8 runtime of a fine-tuned encoder: int8 backbone (checked against its own
            # reference at its load) + the float32 head; it cannot reproduce the SavedModel to
            # 0.999, which is why a training chose it on the hold-out instead.
            if loaded is None:
                raise ValueError(f"encoder {encoder}: no head file, so no int8 runtime")
            self.id, self.info = f"{info.get('id', encoder)}+int8", info
            self.dim, self.image_size = int(loaded[0].kernel.shape[1]), backbone.image_size
            self._head: Head | None = loaded[0]
            self._backbone: Encoder | Int8Encoder | FinetunedEncoder | None = backbone
            self._truth: Encoder | None = None
            self.runtime = f"{backbone.runtime}+head"
            logger.info("loaded fine-tuned encoder %s (dim %d, runtime %s)", self.id, self.dim, self.runtime)
            return
        self.info, self._backbone, self._head, self._truth = info, backbone, None, None
        self.id = info.get("id", encoder)
        # The composed path (fast backbone + NumPy head) serves if it reproduces the SavedModel:
        # first checked against the vectors the export stored, else against the SavedModel itself.
        head = loaded[0] if loaded and backbone is not None and backbone.runtime != "savedmodel" else None
        if head is not None:
            assert backbone is not None
            probe = probe_images(backbone.image_size)
            composed = head.apply(backbone.encode(probe))
            stored = folder / REFERENCE_FILE
            if stored.is_file() and self._reproduces(
                load_npy(stored.read_bytes()), composed, "loading its SavedModel"
            ):
                self._head, self.dim, self.image_size = head, int(head.kernel.shape[1]), backbone.image_size
                self.runtime = f"{backbone.runtime}+head"  # the SavedModel is never loaded
                logger.info(
                    "loaded fine-tuned encoder %s (dim %d, runtime %s)", self.id, self.dim, self.runtime
                )
                return
        truth = Encoder(str(folder / "saved_model"), runtime="savedmodel", encoder_id=self.id)
        self.id, self.dim, self.image_size = truth.id, truth.dim, truth.image_size
        self._truth, self.runtime = truth, "savedmodel"
        if head is not None and self._reproduces(truth.encode(probe), composed, "using its SavedModel"):
            assert backbone is not None
            self._head = head
            self._truth = None  # the composed path is checked; free the second backbone copy
            self.runtime = f"{backbone.runtime}+head"
        logger.info("loaded fine-tuned encoder %s (dim %d, runtime %s)", self.id, self.dim, self.runtime)

    def _reproduces(self, reference: np.ndarray, composed: np.ndarray, otherwise: str) -> bool:
        try:
            check_reproduces("backbone + head", reference, composed)
        except ValueError as exc:
            logger.warning("encoder %s: %s; %s", self.id, exc, otherwise)
            return False
        return True

    def encode(self, images: np.ndarray) -> np.ndarray:
        if self._head is not None and self._backbone is not None:
            return self._head.apply(self._backbone.encode(images))
        assert self._truth is not None
        return self._truth.encode(images)


@dataclass
class _Template:
    """A SavedModel of backbone + head traced once per backbone and head shape; each export
    writes only new head values into a copy (tracing and saving take seconds, this ~0.5 s)."""

    module: Any
    kernel: Any
    bias: Any
    folder: Path


class EncoderPool:
    def __init__(
        self,
        *,
        builtin_model: str = "efficientnet-lite0-imagenet",
        batch_size: int = 32,
        runtime: str = "auto",
        cache_dir: Path | None = None,
        store: ArtifactStore | None = None,
        max_finetuned: int = 6,
        threads: int = 0,
    ) -> None:
        self.builtin_model = builtin_model
        self.batch_size = batch_size
        self.runtime = runtime
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="encoders-"))
        self.store = store
        self.max_finetuned = max_finetuned
        self.threads = threads
        self._base: dict[str, Encoder | Int8Encoder] = {}
        self._finetuned: OrderedDict[str, FinetunedEncoder] = OrderedDict()
        self._templates: dict[tuple, _Template] = {}
        self._lock = threading.Lock()  # guards the dicts only, never held while loading
        self._loading: dict[str, threading.Lock] = {}
        self._export_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, store: ArtifactStore | None = None) -> EncoderPool:
        """The pool the process settings describe (``simserver.settings.Settings``)."""
        return cls(
            builtin_model=settings.builtin_model,
            batch_size=settings.encode_batch_size,
            runtime=settings.encoder_runtime,
            cache_dir=settings.store_cache_dir,
            store=store,
            threads=settings.encoder_threads,
        )

    def get(self, encoder: str) -> Encoder | Int8Encoder | FinetunedEncoder:
        """The loaded encoder for ``encoder``, loading it on first use. A load takes seconds; it
        holds only that encoder's lock, so encoding with the other encoders goes on meanwhile."""
        enc = self._cached(encoder)
        if enc is not None:
            return enc
        with self._lock:
            loading = self._loading.setdefault(encoder, threading.Lock())
        with loading:
            enc = self._cached(encoder)
            if enc is not None:
                return enc
            if is_store_encoder(encoder):
                enc = self._load_finetuned(encoder)
            elif is_int8(encoder):
                enc = self._load_int8(encoder)
            else:
                enc = Encoder(
                    encoder,
                    builtin_model=self.builtin_model,
                    batch_size=self.batch_size,
                    runtime=self.runtime,
                    cache_dir=self.cache_dir,
                    threads=self.threads,
                )
            with self._lock:
                if isinstance(enc, FinetunedEncoder):
                    self._finetuned[encoder] = enc
                    while len(self._finetuned) > self.max_finetuned:
                        old, _ = self._finetuned.popitem(last=False)
                        logger.info("unloaded encoder %s (least recently used)", old)
                else:
                    self._base[encoder] = enc
            return enc

    def batch_stats(self) -> dict[str, dict]:
        """:meth:`Encoder.batch_stats` of each loaded base encoder, by encoder."""
        with self._lock:
            base = dict(self._base)
        return {encoder: st for encoder, enc in base.items() if (st := enc.batch_stats()) is not None}

    def _cached(self, encoder: str) -> Encoder | Int8Encoder | FinetunedEncoder | None:
        with self._lock:
            if is_store_encoder(encoder):
                enc = self._finetuned.get(encoder)
                if enc is not None:
                    self._finetuned.move_to_end(encoder)
                return enc
            return self._base.get(encoder)

    # -- fine-tuned encoders in the store -------------------------------------------------------------
    def _local_folder(self, encoder: str) -> Path:
        where = f"{self.store.uri if self.store else ''}|{encoder}"  # one cache may serve several stores
        return self.cache_dir / "encoders" / hashlib.sha256(where.encode()).hexdigest()[:24]

    def _load_int8(self, encoder: str) -> Int8Encoder:
        """``int8:<base encoder>`` (see :mod:`simserver.int8`)."""
        from simserver.domain_config import BUILTIN
        from simserver.encoder import builtin_model_path

        base = float_name(encoder)
        float32 = self.get(base)  # its id, and its float32 runtime loaded and checked
        if base == BUILTIN:
            local = builtin_model_path(self.builtin_model)[1]
        else:
            import tensorflow_hub as hub

            local = Path(base) if Path(base).is_dir() else Path(hub.resolve(base))
        return Int8Encoder(
            base,
            float32.id,
            local,
            builtin=base == BUILTIN,
            cache_dir=self.cache_dir,
            threads=self.threads or getattr(float32, "threads", 1),
            image_size=float32.image_size,
        )

    def _load_finetuned(self, encoder: str) -> FinetunedEncoder:
        folder = self._local_folder(float_name(encoder))  # its int8 runtime shares the download
        if not folder.is_dir():
            if self.store is None:
                raise ValueError(f"encoder {encoder}: no artifact store to load it from")
            data = self.store.get(float_name(encoder)[len(STORE_PREFIX) :])
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
            try:
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    tar.extractall(tmp, filter="data")
                os.replace(tmp, folder)
            except Exception:
                shutil.rmtree(tmp, ignore_errors=True)
                if not folder.is_dir():  # another thread or process won the race: fine
                    raise
        loaded = load_head(folder)
        backbone_name = loaded[1]["backbone"] if loaded else None
        if backbone_name is not None and is_int8(encoder):
            backbone_name = int8_name(backbone_name)
        elif is_int8(encoder):
            raise ValueError(f"encoder {encoder}: no head file, so no int8 runtime")
        backbone = self.get(backbone_name) if backbone_name else None
        return FinetunedEncoder(folder, encoder, backbone, loaded)

    def export(self, backbone: str, head: Head, key: str, info: dict) -> str:
        """Save backbone ``backbone`` + ``head`` as one SavedModel tar at ``key`` in the store;
        return the new encoder (``store:<key>``). Nothing is visible until the caller publishes."""
        if self.store is None:
            raise ValueError("exporting a fine-tuned encoder needs an artifact store")
        if not ENCODER_KEY.match(key):  # never overwrite pointers, indices or images
            raise ValueError(f"not an encoder key: {key!r}")
        import tensorflow as tf

        base = self.get(backbone)
        assert isinstance(base, Encoder)
        encoder = STORE_PREFIX + key
        with self._export_lock:
            t = self._template(base, head.kernel.shape)
            t.kernel.assign(head.kernel)
            t.bias.assign(head.bias)
            folder = self._local_folder(encoder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
            try:
                model = tmp / "saved_model"
                model.mkdir()
                shutil.copy(t.folder / "saved_model" / "saved_model.pb", model / "saved_model.pb")
                if (t.folder / "saved_model" / "assets").is_dir():
                    shutil.copytree(t.folder / "saved_model" / "assets", model / "assets")
                tf.train.Checkpoint(root=t.module).write(str(model / "variables" / "variables"))
                full_info = {
                    **info,
                    "backbone": backbone,
                    "backbone_id": base.id,
                    "dim": head.kernel.shape[1],
                }
                write_head_files(tmp, head, full_info)
                probe = tf.constant(probe_images(base.image_size).astype(np.float32) / 255.0)
                (tmp / REFERENCE_FILE).write_bytes(npy_bytes(t.module(probe).numpy()))
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as tar:  # weights barely compress
                    tar.add(tmp, arcname=".")
                self.store.put(key, buf.getvalue())
                if folder.is_dir():
                    shutil.rmtree(folder)
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return encoder

    def prepare_export(self, backbone: str, output_dim: int) -> None:
        """Trace the export template ahead of the first training (it takes seconds)."""
        base = self.get(backbone)
        assert isinstance(base, Encoder)
        with self._export_lock:
            self._template(base, (base.dim, output_dim))

    def _template(self, base: Encoder, shape: tuple[int, int]) -> _Template:
        key = (base.name, tuple(shape))
        t = self._templates.get(key)
        if t is None:
            # A scratch folder of this process (only its own module may write checkpoints into
            # copies of it), removed at exit.
            folder = Path(tempfile.mkdtemp(prefix="export-template-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            zero = Head(np.zeros(shape, np.float32), np.zeros(shape[1], np.float32))
            module = export_finetuned(base.resolved, zero, folder, image_size=base.image_size)
            t = _Template(module, module.head_kernel, module.head_bias, folder)
            self._templates[key] = t
        return t


class LocalBackend:
    """Training backend running TensorFlow in this process (CLI, scripts, tests)."""

    def __init__(self, pool: EncoderPool, encoder: str) -> None:
        self.pool = pool
        self.encoder = encoder
        self.encoder_id = pool.get(encoder).id

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self.pool.get(self.encoder).encode(images)

    def encode_with(self, images: np.ndarray, encoder: str) -> np.ndarray:
        return self.pool.get(encoder).encode(images)

    def encode_text(self, texts: list[str], encoder: str) -> np.ndarray:
        from simserver.text_encoder import shared_pool

        return shared_pool().get(encoder).encode(texts)

    def train_head(self, features: np.ndarray, labels: list[str], config: TrainingConfig) -> Head:
        return train_head(features, labels, config)

    def export(self, head: Head, key: str, info: dict) -> str:
        return self.pool.export(self.encoder, head, key, info)
