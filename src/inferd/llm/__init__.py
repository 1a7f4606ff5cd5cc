"""The LLM engine (continuous batching, paged KV cache, prefix caching). Its home; the engine itself
arrives with the LLM-engine work, and the import contract covers it from the start."""
