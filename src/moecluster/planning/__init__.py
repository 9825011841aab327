"""moecluster.planning: routing statistics, placement metrics and the placement planner (pure Python, no torch)."""
