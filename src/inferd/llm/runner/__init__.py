"""Turning a scheduled batch into flat tensors and running the model over the paged KV cache."""
