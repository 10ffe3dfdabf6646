"""Image-similarity model server: encoders, FAISS domain indices and their artifact store."""
