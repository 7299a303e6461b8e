"""Operations: the Prefect flow and its stage runner, the local server, deployments and workers,
the project lock, the process leash, run summaries and comparisons."""
