"""Image-similarity model server: encoders, FAISS domain indices and their artifact store."""

import os

# FAISS's OpenMP threads otherwise spin for a while after every parallel region, burning a core
# that the encoder needs (libgomp reads this once, when FAISS is first imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
