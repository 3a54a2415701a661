"""BiFlow: bidirectional normalizing flows."""
