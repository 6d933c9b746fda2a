"""The theory grid's configuration: which Section 3 instances `reteq theory` checks (configs/theory.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from reteq import tracking as tk
from reteq.config_files import Name, read_yaml_mapping, validated

PosInt = Annotated[int, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class TheoryConfig(BaseModel):
    """The grid of Section 3 instances. Every combination of the list fields is one Tune trial (a cell) that
    runs `seeds` random instances. The defaults give 2*1*2*2*2 = 16 cells x 13 seeds = 208 instances.
    A seed draws the same data in every cell with the same (d, n_a, n_b, k), so cells that differ only in
    mu or eta are paired comparisons on identical designs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name = Field(
        tk.THEORY_EXPERIMENT, description="sweep name: the reteq.sweep tag and the Tune run name "
        "(config_files.NAME_PATTERN)"
    )
    d: list[PosInt] = Field([40, 80], min_length=1, description="parameter dimensions")
    stage_sizes: list[tuple[PosInt, PosInt]] = Field(
        [(10, 15)], min_length=1, description="(n_a, n_b) row counts of the two ordered stages"
    )
    k: list[PosInt] = Field(
        [2, 4], min_length=1, description="forget-set rows; each must be <= every d and <= m"
    )
    m: PosInt = Field(64, description="test rows for the RE distance; m >= k keeps sigma_U a valid bound")
    mu: list[PosFloat] = Field([0.5, 2.0], min_length=1, description="proximal ridge strengths")
    eta: list[PosFloat] = Field([0.5, 1.0], min_length=1, description="gradient-ascent step sizes")
    seeds: PosInt = Field(
        13, description="random instances per cell (seeds first_seed .. first_seed+seeds-1)"
    )
    first_seed: int = Field(0, ge=0)
    steps: PosInt = Field(40, le=1000, description="unlearning steps t = 0..steps")
    cpus_per_trial: PosFloat = Field(
        0.5, le=64, description="Ray CPUs per trial (a fraction: trials are cheap)"
    )
    max_concurrent_trials: PosInt = Field(
        2, description="more only adds process start-ups and SQLite lock waits on a small machine"
    )
    time_budget_s: PosFloat = Field(
        600,
        description="Tune stops the grid after this many seconds; unfinished "
        "trials then fail the run instead of hanging (e.g. on unmet resources)",
    )

    @model_validator(mode="after")
    def _forget_set_fits(self) -> TheoryConfig:
        if max(self.k) > min(self.d):
            raise ValueError(f"k={max(self.k)} exceeds d={min(self.d)}: X_U could not have full row rank")
        if max(self.k) > self.m:
            raise ValueError(
                f"k={max(self.k)} exceeds m={self.m}: sigma_U would not bound the forget row space"
            )
        return self

    def cells(self) -> list[dict[str, Any]]:
        return [
            {"d": d, "n_a": na, "n_b": nb, "k": k, "mu": mu, "eta": eta}
            for d in self.d
            for (na, nb) in self.stage_sizes
            for k in self.k
            for mu in self.mu
            for eta in self.eta
        ]

    @property
    def instances(self) -> int:
        return len(self.cells()) * self.seeds


def load_theory_config(path: str | Path | None) -> TheoryConfig:
    """YAML file -> TheoryConfig (None or an empty file: defaults); problems raise ConfigError, one line each."""
    if path is None:
        return TheoryConfig()
    return validated(TheoryConfig, read_yaml_mapping(path, empty_ok=True), str(path))
