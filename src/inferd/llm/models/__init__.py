"""Loading decoder-only models through transformers' own model classes."""
