"""segflow orchestration: the Prefect flow over the DVC stages, and the segflow command."""
