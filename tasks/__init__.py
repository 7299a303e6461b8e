"""segflow pipeline stages: one module per dvc.yaml stage (python -m tasks.<stage>)."""
