"""Float precision passes: float16 storage of float32 weights."""
