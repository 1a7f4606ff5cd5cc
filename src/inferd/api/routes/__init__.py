"""HTTP handlers: parse, delegate, return."""
