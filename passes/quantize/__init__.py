"""Quantization passes: targets, weights, dynamic and static QDQ, GPTQ, outliers, reports."""
