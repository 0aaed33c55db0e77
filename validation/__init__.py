"""pipetwin: validation package."""
