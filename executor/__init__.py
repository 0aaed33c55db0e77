"""pipetwin: executor package."""
