"""Metrics and measurements: FID/KID, saved-activation memory, benchmarks, loss plots."""
