"""The planner: validation of recipes against plugins, resolution to a plan, estimates, search."""
