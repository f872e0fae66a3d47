"""Unsupervised training: Lanczos Ritz-vector data and the scale-invariant
loss of Kaneda et al. (ICML 2023)."""
