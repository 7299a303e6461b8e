"""The Lightning machinery both task families train with: budgets, progress, checkpoints, devices."""
