"""Evaluation: forget score (label + paraphrases), likelihood utility (TOFU), math accuracy (GSM8K), R/C/U depth."""
