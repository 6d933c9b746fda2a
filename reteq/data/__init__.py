"""Data: sources (synthetic, local, hub) -> chat conversations -> tokens with assistant-only labels -> batches."""
