"""Small helpers shared across salt (no physics, no torch models)."""
