"""medfed.simulations."""
