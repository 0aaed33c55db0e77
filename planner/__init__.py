"""pipetwin: planner package."""
