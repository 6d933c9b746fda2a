"""reteq: path dependence in machine unlearning, as Ray-distributed sweeps (Yu, He, Goyal, Arora, 2025)."""

__version__ = "0.1.0"
