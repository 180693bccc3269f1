"""Model sources, per-architecture anatomy and the shared forward with an embedding prefix."""
