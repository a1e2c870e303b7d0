"""REFUEL and its baselines (DPO, REBEL) trained against the refuel_env dialogue environment."""
