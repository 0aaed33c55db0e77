"""pipetwin: sim package."""
