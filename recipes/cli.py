"""Shared command-line plumbing for the recipes: compose the Hydra config, fail cleanly.

Configs are composed with Hydra's compose API from the package's own config folder, so a recipe
works from any working directory and from an installed package, writes no Hydra output folders,
and turns every config problem into one paragraph on stderr with exit code 2.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from parallel.mesh import report_once
from recipes.help import HelpRequest, UnknownSection, config_groups, help_request, render_help

CONFIG_ERROR_EXIT = 2


def config_dir() -> Path:
    """`configs/` beside the packages in a source tree, else the copy installed as package data."""
    source_tree = Path(__file__).resolve().parent.parent / "configs"
    if (source_tree / "pretrain.yaml").is_file():
        return source_tree
    import recipes._configs as installed  # packaged from configs/ by pyproject.toml

    return Path(installed.__file__).parent


def fail(message: str, code: int = CONFIG_ERROR_EXIT) -> NoReturn:
    """Print an error once per job (by the first rank that reports it) and exit with `code`."""
    report_once(f"error: {message}")
    raise SystemExit(code)


def _problem(exc: BaseException) -> str:
    """The first line of an OmegaConf/Hydra message, without its key/type trailer."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(("full_key", "object_type", "reference_type"))), "")


def _key_of(exc: BaseException) -> str | None:
    for candidate in (exc, exc.__cause__):
        key = getattr(candidate, "full_key", None)
        if key:
            return key
    match = re.search(r"override '([^']+)'|Could not find '([^/']+)/", str(exc))
    return (match.group(1) or match.group(2)) if match else None


def compose_config(name: str, overrides: list[str], require_values: bool = True) -> DictConfig:
    """Compose `configs/<name>.yaml` with command-line overrides; exit 2 on unknown keys or bad types,
    and on required (`???`) keys left unset unless `require_values` is false."""
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name=name, overrides=overrides)
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg)) if require_values else []
        if missing:
            fail(f"config error at `{missing[0]}`: no value given. Fix: set {missing[0]}=<value> on the command line.")
        return cfg
    except (HydraException, OmegaConfBaseException) as exc:
        key = _key_of(exc) or "<override>"
        problem = _problem(exc.__cause__ or exc).rstrip(".")
        options = re.search(r"Available options in '[^']+':\s*((?:\s*\S+)+)", str(exc))
        fix = (f"pick one of: {' '.join(options.group(1).split())}." if options else
               f"check the key's spelling and type against `python -m recipes.{name} --cfg`, "
               "or add a new key with `+key=value`.")
        fail(f"config error at `{key}`: {problem}. Fix: {fix}")


def parse_args(name: str, argv: list[str]) -> DictConfig:
    """The composed config from command-line overrides; `--cfg` prints it and exits, `--help [section]`
    prints the groups and keys (see recipes/help.py) and exits."""
    request = help_request(argv)
    if request is not None:
        print_help(name, request)
    overrides = [a for a in argv if a != "--cfg"]
    bad = [a for a in overrides if a.startswith("-")]
    if bad:
        fail(f"unknown option {bad[0]!r}. Fix: pass config overrides as key=value (see --help).")
    cfg = compose_config(name, overrides)
    if "--cfg" in argv:
        print(OmegaConf.to_yaml(cfg))
        raise SystemExit(0)
    return cfg


def print_help(name: str, request: HelpRequest) -> NoReturn:
    """Print the help of `recipes.<name>` for the config composed from the request's overrides; exit 0."""
    cfg = compose_config(name, request.overrides, require_values=False)
    try:
        usage = f"python -m recipes.{name} [group=option ...] [key=value ...] [--cfg] [--help [section]]"
        text = render_help(usage, cfg, config_groups(config_dir(), name), request.section)
    except UnknownSection as exc:
        fail(str(exc))
    trailer = f"\n\nconfig: {config_dir() / (name + '.yaml')}; `--cfg` prints the composed config."
    print(text + (trailer if request.section is None else ""))
    raise SystemExit(0)


@contextmanager
def config_errors() -> Iterator[None]:
    """Turn a ConfigError / LayoutError (exit 2) or a RunStopped (its own exit code) raised inside the
    block into one paragraph on stderr and a clean exit."""
    from parallel.errors import LayoutError
    from titan.config import ConfigError
    from titan.errors import RunStopped

    try:
        yield
    except (ConfigError, LayoutError) as exc:
        fail(str(exc))
    except RunStopped as exc:
        fail(str(exc), exc.exit_code)
