"""asyncweights."""
