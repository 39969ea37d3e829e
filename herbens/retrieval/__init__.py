"""Retrieval classifiers on a run's stored embeddings: exact/faiss search, class prototypes
(with k-means sub-centres), kNN, and their pseudo-runs for the ensembler."""
