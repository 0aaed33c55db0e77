"""pipetwin: topologies package."""
