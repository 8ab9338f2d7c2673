"""Rank-side code: the Ray actor that hosts one torch rank, and how models are parallelised."""
