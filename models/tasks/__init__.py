"""Lightning modules, one per task family (configs/task/ mirrors this folder), on the shared `TaskModule`."""
