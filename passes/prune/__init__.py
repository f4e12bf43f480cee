"""Pruning passes: unstructured, N:M, structured channels."""
