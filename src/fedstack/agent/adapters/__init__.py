"""Adapters between framework models (PyTorch modules, scikit-learn estimators, Keras 3
models) and Weights; each imports its framework, so import the one you use."""
