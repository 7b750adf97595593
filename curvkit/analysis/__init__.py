"""Curvature analysis: loss landscapes, spectra, sharpness tracking."""
