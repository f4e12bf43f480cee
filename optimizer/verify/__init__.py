"""Verification with onnxruntime: sessions, validation, metrics, benchmark, fusion check, isolation, debugging."""
