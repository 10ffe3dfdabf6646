"""Benchmarks, one module per figure set; ``simserver bench <name>`` runs each (see ``simserver.cli.bench``).

* :mod:`~simserver.bench.encoder`: encoder runtimes (SavedModel, TFLite) at batch 1 and 32;
* :mod:`~simserver.bench.index`: FAISS index kinds by size (build, ms/query, recall@10, bytes/vector);
* :mod:`~simserver.bench.http`: a real ``bentoml serve``: latency, throughput and where the CPU goes,
  against the encoder's own speed measured in the same run;
* :mod:`~simserver.bench.training`: training time against encoding once;
* :mod:`~simserver.bench.quantization`: the int8 study;
* :mod:`~simserver.bench.relevance`: ``/relevance``'s algorithm against the reference notebook's;
* :mod:`~simserver.bench.suite`: several of them in one JSON object.

Every benchmark returns a plain dict (JSON-ready); printing is the CLI's job. Shared pieces:
:mod:`~simserver.bench.common` (synthetic vectors, demo images, timing) and
:mod:`~simserver.bench.server` (starting and measuring a real server).
"""
