"""Training: the per-step loop (shared by every runner) and the runners built on it."""
