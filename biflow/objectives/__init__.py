"""Training objectives, kept apart from the networks (stage 1: NLL; stage 2: reverse-model losses)."""
