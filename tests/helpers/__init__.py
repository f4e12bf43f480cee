"""Shared test helpers, imported by test modules (conftest.py keeps only fixtures and hooks).

``samples``: the bundled sample models, seeded feeds, graph walks and file digests;
``runtime``: the one place tests open onnxruntime sessions of their own (``run_model``).
"""
