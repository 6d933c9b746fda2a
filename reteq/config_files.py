"""Config files to typed models, every problem as one `file: field: reason` line (a ConfigError).

Shared by the sweep config (reteq.config) and the theory grid's config (reteq.theory.config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reteq.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """The base of every config model: an unknown field (a typo) is an error, not ignored; values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for x in loc:
        if isinstance(x, int):
            parts.append(f"[{x}]")
        else:
            parts.append(("." if parts else "") + str(x))
    return "".join(parts) or "(top level)"


def _message(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    if err.get("type") == "missing":
        msg = "required field is missing"
    if err.get("type") in ("float_parsing", "float_type"):
        msg = f"not a number ({err.get('input')!r})"
    if err.get("type") == "greater_than":
        msg = f"must be > {err.get('ctx', {}).get('gt')} (got {err.get('input')!r})"
    return msg


def read_yaml_mapping(path: str | Path, *, empty_ok: bool = False) -> dict[str, Any]:
    """A YAML file's top-level mapping; ConfigError (one line) when it is missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: file does not exist"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({str(e).splitlines()[0]})"]) from None
    if raw is None and empty_ok:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: top level must be a mapping"])
    return raw


def validated(model: type[M], raw: dict[str, Any], source: str) -> M:
    """`model.model_validate(raw)`, every problem as one `source: field: reason` line of a ConfigError."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = err["loc"]
            # model validators report at their model's level; their messages already start with the field
            prefix = f"{_field_path(loc)}: " if loc else ""
            lines.append(f"{source}: {prefix}{_message(err)}")
        raise ConfigError(lines) from None
    except ValueError as e:  # raised outside pydantic's wrapping (e.g. stage_orders)
        raise ConfigError([f"{source}: {e}"]) from None
