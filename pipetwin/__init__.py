"""pipetwin: pipetwin package."""
