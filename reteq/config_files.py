"""Config files to typed models, every problem as one `file: field: reason` line (a ConfigError).

Shared by the sweep config (reteq.config) and the theory grid's config (reteq.theory.config).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from reteq.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

# Bounds on what a config file may make the parser do (docs/security.md): a sweep config is a few KB, so these
# refuse only hostile or broken files. An alias bomb (`b: [*a, *a, ...]` nested) is a few hundred bytes that
# expand to billions of values: PyYAML shares the aliased nodes, so the file composes fast, but anything that
# walks the result (pydantic, an error message) walks every copy. The expanded size is counted on the node graph
# (each node once, memoised) before anything is constructed.
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB
MAX_ALIASES = 100  # `*name` uses in one file
MAX_EXPANDED_NODES = 100_000  # scalars + collections once every alias is expanded


class Strict(BaseModel):
    """The base of every config model: an unknown field (a typo) is an error, not ignored; values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]

# Sane bounds (docs/security.md): far above any real sweep, low enough that a typo or a hostile file is refused
# at validate instead of allocating or looping for hours. `--max-leaves` raises the grid's.
MAX_LEAVES = 10_000  # unlearning runs in one sweep (validate / plan / sweep: --max-leaves N goes past it)
MAX_ROWS = 10_000_000  # rows of one data source
MAX_LENGTH = 131_072  # tokens of one sequence
MAX_STEPS = 10_000_000  # optimizer steps, eval and checkpoint intervals
MAX_EPOCHS = 10_000
MAX_BATCH = 1 << 20  # sequences in one batch
MAX_WORKERS = 4096  # Ray Train workers, concurrent trials
MAX_CPUS = 1024.0  # CPUs (or GPUs) per worker
MAX_SAMPLES = 100_000  # eval questions, samples per question, probe pairs

# A name (sweep, model, stage) becomes an MLflow experiment, a run filter, a Tune run folder and a file name:
# it must be a name, not a path or a quote (docs/security.md).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME = re.compile(NAME_PATTERN)


def _is_name(v: str) -> str:
    if not _NAME.fullmatch(v):
        raise ValueError(f"{clip(repr(v), 80)} is not a name: 1-64 letters, digits, '.', '_' or '-', starting "
                         f"with a letter or digit ({NAME_PATTERN})")
    return v


Name = Annotated[str, AfterValidator(_is_name)]


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` characters (an error line never carries a whole hostile value)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    got = clip(repr(err.get("input")), 60)
    if err.get("type") in ("float_parsing", "float_type"):
        msg = f"not a number ({got})"
    if err.get("type") == "greater_than":
        msg = f"must be > {err.get('ctx', {}).get('gt')} (got {got})"
    if err.get("type") == "less_than_equal":
        msg = f"must be <= {err.get('ctx', {}).get('le')} (got {got}; docs/security.md lists the bounds)"
    if err.get("type") == "finite_number":
        msg = f"must be a finite number (got {got})"
    return msg


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that counts alias uses while composing (refused past MAX_ALIASES)."""

    aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise _TooBig(f"more than {MAX_ALIASES} YAML aliases")
        return super().compose_node(parent, index)


class _TooBig(Exception):
    pass


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has once every alias is expanded, without expanding it (memoised per node;
    iterative, so a deep file cannot exhaust the stack); _TooBig past MAX_EXPANDED_NODES or on a cycle."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        if id(node) in size:
            continue
        kids: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            kids = [x for pair in node.value for x in pair]
        if not children_done:
            if id(node) in open_:
                raise _TooBig("a recursive YAML alias")
            open_.add(id(node))
            stack.append((node, True))
            for k in kids:
                if id(k) in open_:
                    raise _TooBig("a recursive YAML alias")
                stack.append((k, False))
            continue
        open_.discard(id(node))
        size[id(node)] = 1 + sum(size[id(k)] for k in kids)
        if size[id(node)] > MAX_EXPANDED_NODES:
            raise _TooBig(f"its YAML aliases expand to more than {MAX_EXPANDED_NODES} values")
    return size[id(root)]


def safe_yaml(text: str) -> Any:
    """yaml.safe_load with bounds: at most MAX_ALIASES alias uses and MAX_EXPANDED_NODES values once expanded
    (`_TooBig` otherwise), checked on the composed node graph before any Python object is built."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_mapping(path: str | Path, *, empty_ok: bool = False) -> dict[str, Any]:
    """A YAML file's top-level mapping; ConfigError (one line) when it is missing, over MAX_CONFIG_BYTES, not
    YAML, over the alias bounds (`safe_yaml`) or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: file does not exist"])
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: file is {path.stat().st_size} bytes; a config may be at most "
                           f"{MAX_CONFIG_BYTES} bytes"])
    try:
        raw = safe_yaml(path.read_text())
    except _TooBig as e:
        raise ConfigError([f"{path}: refused: {e} (docs/security.md)"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({str(e).splitlines()[0]})"]) from None
    if raw is None and empty_ok:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: top level must be a mapping"])
    return raw


MAX_OVERRIDES = 64  # `--set` flags on one command line


def apply_overrides(raw: dict[str, Any], overrides: tuple[str, ...] | list[str], source: str) -> dict[str, Any]:
    """`raw` with each `FIELD=VALUE` of `--set` applied, e.g. `seeds=[0,1]`, `unlearn.lrs=[3e-4]`,
    `stages.0.lr=5e-5`. FIELD is a dotted path (a number picks a list item; a missing mapping is created);
    VALUE is YAML, read with the file's bounds. Why: a slice of a design (fewer seeds, methods or lrs) is the
    same config with a few fields changed, and its leaves keep the keys the whole design gives them, so running
    the whole design later reuses every leaf the slice finished. Problems: one line naming `--set FIELD`."""
    if len(overrides) > MAX_OVERRIDES:
        raise ConfigError([f"{source}: at most {MAX_OVERRIDES} --set flags (got {len(overrides)})"])
    out = copy.deepcopy(raw)
    for text in overrides:
        path, eq, value = text.partition("=")
        where = f"{source}: --set {clip(path, 80)}"
        if not eq or not path.strip():
            raise ConfigError([f"{source}: --set {clip(text, 80)!r}: expected FIELD=VALUE, e.g. seeds=[0,1]"])
        try:
            parsed = safe_yaml(value)
        except _TooBig as e:
            raise ConfigError([f"{where}: refused: {e} (docs/security.md)"]) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"{where}: value is not valid YAML ({str(e).splitlines()[0]})"]) from None
        *parents, last = path.strip().split(".")
        node: Any = out
        for part in parents:
            node = _child(node, part, where, create=True)
        if isinstance(node, list):
            node[_index(node, last, where)] = parsed
        elif isinstance(node, dict):
            node[last] = parsed
        else:
            raise ConfigError([f"{where}: {clip(last, 40)!r} is inside a {type(node).__name__}, not a mapping or list"])
    return out


def _index(items: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError([f"{where}: {clip(part, 40)!r} is not an item of a list of {len(items)}"])
    return int(part)


def _child(node: Any, part: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError([f"{where}: {clip(part, 40)!r} is inside a {type(node).__name__}, not a mapping or list"])
    if part not in node and create:
        node[part] = {}
    return node[part]


def validated(model: type[M], raw: dict[str, Any], source: str, context: dict[str, Any] | None = None) -> M:
    """`model.model_validate(raw)`, every problem as one `source: field: reason` line of a ConfigError;
    `context`: what validators read besides the file (the command's limits, e.g. `max_leaves`)."""
    try:
        return model.model_validate(raw, context=context)
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
