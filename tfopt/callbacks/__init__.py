"""tfopt callbacks."""
