"""Calibration: feeds, activation ranges, histograms, Hessian statistics, sensitivity."""
