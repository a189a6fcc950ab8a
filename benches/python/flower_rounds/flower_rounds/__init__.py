"""Minimal Flower App for measuring deployment-runtime round overhead."""
