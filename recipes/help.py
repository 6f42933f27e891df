"""`--help` for the recipes: config groups, then every key with its type, default and meaning.

A key's meaning is the trailing `# comment` on its field in the schema dataclass (titan/config.py,
the recipes' own configs), read from the source with `ast` and `tokenize`, so the help text and the
schema cannot drift apart. Defaults are read from the composed config (YAML groups applied), and
types from the dataclasses' annotations.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

HELP_FLAGS = ("-h", "--help")
Row = tuple[str, str, str, str]  # key, type, default, doc


class UnknownSection(ValueError):
    """`--help <section>` named no section of the config."""


@dataclass
class HelpRequest:
    """What `--help` asked for: one section (or all) of the config composed from `overrides`."""

    section: str | None
    overrides: list[str]


def help_request(argv: list[str]) -> HelpRequest | None:
    """The help request in `argv` (`-h`/`--help [section]`), or None when help was not asked for."""
    flag = next((i for i, arg in enumerate(argv) if arg in HELP_FLAGS), None)
    if flag is None:
        return None
    following = argv[flag + 1:flag + 2]
    section = following[0] if following and not following[0].startswith("-") and "=" not in following[0] else None
    skip = flag + 1 if section else None
    return HelpRequest(section, [arg for i, arg in enumerate(argv) if not arg.startswith("-") and i != skip])


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the trailing `# comment` on the field's (last) line in `cls`'s source."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    body = ast.parse(source).body[0].body
    return {node.target.id: comments[node.end_lineno] for node in body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and node.end_lineno in comments}


def undocumented_fields(cls: type) -> list[str]:
    """`Class.field` for every field of `cls` and of the dataclasses nested in it without a doc."""
    docs = field_docs(cls)
    missing = [f"{cls.__name__}.{f.name}" for f in dataclasses.fields(cls) if not docs.get(f.name)]
    return missing + [name for nested in _nested_dataclasses(cls) for name in undocumented_fields(nested)]


def _nested_dataclasses(cls: type) -> list[type]:
    """The dataclasses that fields of `cls` hold (config sections such as `training`)."""
    hints = typing.get_type_hints(cls)
    return [hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]


def type_name(annotation: Any) -> str:
    """A short name for a field annotation: `int`, `str | null`, `list[int] | null`, `any`."""
    if annotation is Any:
        return "any"
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:
        named = [type_name(arg) for arg in args if arg is not type(None)]
        return " | ".join(named + (["null"] if type(None) in args else []))
    if typing.get_origin(annotation) is list:
        return f"list[{type_name(args[0])}]" if args else "list"
    return getattr(annotation, "__name__", str(annotation))


def _value(node: DictConfig, key: str) -> str:
    """The composed default of `node.key` as it is written on the command line."""
    if OmegaConf.is_missing(node, key):
        return "??? (required)"
    value = node[key]
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return (value or "''") if isinstance(value, str) else json.dumps(value)


def _schema(node: DictConfig) -> tuple[dict[str, str], dict[str, Any]]:
    """The field docs and type annotations of the dataclass behind `node` (empty for a plain node)."""
    cls = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(cls):
        return {}, {}
    return field_docs(cls), typing.get_type_hints(cls)


def _is_node(cfg: DictConfig, key: str) -> bool:
    """Whether `cfg.key` is a nested config node rather than a value."""
    return not OmegaConf.is_missing(cfg, key) and OmegaConf.is_dict(cfg[key])


def _rows(node: DictConfig, prefix: str, keys: list[str] | None = None) -> list[Row]:
    """(key, type, default, doc) of every leaf under `node` (or of `keys`), nested nodes as dot paths."""
    docs, hints = _schema(node)
    rows = []
    for key in node if keys is None else keys:
        path = f"{prefix}{key}"
        if _is_node(node, key):
            rows.append((f"{path}:", "", "", docs.get(key, "")))
            rows += _rows(node[key], f"{path}.")
        else:
            rows.append((path, type_name(hints[key]) if key in hints else "any", _value(node, key), docs.get(key, "")))
    return rows


def _table(rows: list[Row]) -> str:
    """Rows as aligned columns: key, type, default, then the doc."""
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3] for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def sections(cfg: DictConfig) -> list[str]:
    """The config's top-level nodes: `model`, `training`, ... (what `--help <section>` takes)."""
    return [key for key in cfg if _is_node(cfg, key)]


def render_section(cfg: DictConfig, section: str, groups: dict[str, tuple[list[str], str]]) -> str:
    """One section's heading (its doc, and its options when it is a config group) and its keys."""
    doc = _schema(cfg)[0].get(section, "")
    lines = [f"{section}: {doc}".rstrip()]
    if section in groups:
        lines.append(f"  options ({section}=<option>): {_options(*groups[section])}")
    lines.append(_table(_rows(cfg[section], f"{section}.")))
    return "\n".join(lines)


def _options(options: list[str], default: str) -> str:
    return " | ".join(f"{option} (default)" if option == default else option for option in options)


def render_help(usage: str, cfg: DictConfig, groups: dict[str, tuple[list[str], str]],
                section: str | None = None) -> str:
    """The whole help text, or one section's with `section`; raises UnknownSection for a bad name."""
    names = sections(cfg)
    if section is not None and section not in names:
        listed = " ".join(names) or "(none here: --help alone lists every key)"
        raise UnknownSection(f"unknown help section {section!r}. Fix: use --help <section> with one of: {listed}.")
    if section is not None:
        return render_section(cfg, section, groups)
    parts = [f"usage: {usage}"]
    if groups:
        width = max(map(len, groups))
        parts.append("config groups (group=option):\n" + "\n".join(
            f"  {group.ljust(width)}  {_options(*choice)}" for group, choice in groups.items()))
    top = [key for key in cfg if key not in names]
    if top:
        parts.append("keys (key=value):\n" + _table(_rows(cfg, "", top)))
    parts += [render_section(cfg, name, groups) for name in names]
    if names:
        parts.append(f"sections: {' '.join(names)}. `--help <section>` shows one; overrides given with --help "
                     "(key=value, group=option) change the defaults shown.")
    return "\n\n".join(parts)


def config_groups(config_dir: Path, name: str) -> dict[str, tuple[list[str], str]]:
    """Group -> (its options, the default) for the groups in `configs/<name>.yaml`'s defaults list."""
    defaults = OmegaConf.load(config_dir / f"{name}.yaml").get("defaults", [])
    chosen = [(group, default) for entry in defaults if isinstance(entry, DictConfig)
              for group, default in entry.items()]
    return {group: (sorted(p.stem for p in (config_dir / group).glob("*.yaml")), default)
            for group, default in chosen}
