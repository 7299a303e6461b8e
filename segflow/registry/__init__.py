"""The model registry: model cards, the champion/challenger gate, GTO versions and stages, fetching a version."""
