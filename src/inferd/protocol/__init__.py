"""Wire formats: pydantic models only, one module per API family."""
