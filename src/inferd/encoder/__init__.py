"""The encoder engine: embeddings and reranking with token-budget dynamic batching."""
