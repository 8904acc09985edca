"""medfed.common."""
