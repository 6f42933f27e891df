"""`--help` of the recipes and the launcher: groups, keys with types, composed defaults and the schema's
own field docs; and every schema field has such a doc."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

import titan.config
from launch.cli import _parser
from recipes.export import ExportConfig
from recipes.help import field_docs, help_request, undocumented_fields
from recipes.prepare_data import PrepareDataConfig
from tests.helpers import run_recipe, subprocess_env

SCHEMA_MODULE_CLASSES = [cls for _, cls in inspect.getmembers(titan.config, dataclasses.is_dataclass)
                         if cls.__module__ == titan.config.__name__]


def _row(text: str, key: str, type_: str, default: str) -> str:
    """The help line of `key`; asserts its type and default columns."""
    match = re.search(rf"^  {re.escape(key)}\s+{re.escape(type_)}\s+{re.escape(default)}(\s+(.*))?$", text, re.M)
    assert match, f"no row `{key}  {type_}  {default}` in:\n{text}"
    return match.group(2) or ""


@pytest.fixture(scope="module")
def pretrain_help() -> str:
    proc = run_recipe("recipes.pretrain", ["--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ---------------------------------------------------------------- field docs

@pytest.mark.parametrize("cls", [*SCHEMA_MODULE_CLASSES, PrepareDataConfig, ExportConfig], ids=lambda c: c.__name__)
def test_every_schema_field_has_a_one_line_doc(cls):
    assert undocumented_fields(cls) == [], "add a trailing `# comment` to these fields"


@dataclass
class _Inner:
    documented: int = 1  # has a doc
    bare: str = "x"


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)  # a nested node
    flag: bool = False  # also documented


def test_a_field_without_a_doc_is_reported_through_nesting():
    assert field_docs(_Inner) == {"documented": "has a doc"}
    assert undocumented_fields(_Outer) == ["_Inner.bare"]


def test_help_request_splits_section_from_overrides():
    assert help_request(["model=debug"]) is None
    request = help_request(["model=125m", "--help", "training", "lr=wsd"])
    assert (request.section, request.overrides) == ("training", ["model=125m", "lr=wsd"])
    assert help_request(["-h", "model=debug"]).section is None


# ---------------------------------------------------------------- recipes.pretrain

def test_pretrain_help_lists_the_groups_with_their_options(pretrain_help):
    groups = pretrain_help.split("\n\n")[1]
    assert groups.startswith("config groups")
    for group, options in [("model", ["debug", "small (default)", "125m", "1b"]),
                           ("data", ["pydoc (default)", "jsonl"]),
                           ("lr", ["cosine (default)", "wsd"]), ("optim", ["adamw"]), ("parallel", ["default"]),
                           ("checkpoint", ["default"]), ("logging", ["default"])]:
        line = next(line for line in groups.splitlines() if line.split()[0] == group)
        assert all(option in line for option in options), line


def test_pretrain_help_shows_every_key_with_type_composed_default_and_schema_doc(pretrain_help):
    # Composed defaults: model=small and pretrain.yaml's run.name interpolation, not the dataclass defaults.
    assert _row(pretrain_help, "model.dim", "int", "256") == field_docs(titan.config.ModelConfig)["dim"]
    assert _row(pretrain_help, "run.name", "str", "small-pydoc") == field_docs(titan.config.RunConfig)["name"]
    assert _row(pretrain_help, "parallel.pp_layers_per_stage", "list[int] | null", "null")
    assert _row(pretrain_help, "logging.wandb.mode", "str", "online")
    for section in ("model", "data", "training", "optim", "lr", "eval", "parallel", "checkpoint", "logging", "run"):
        doc = field_docs(titan.config.PretrainConfig)[section]
        assert f"\n{section}: {doc}\n" in pretrain_help
        cls = type(getattr(titan.config.PretrainConfig(), section))
        for name, doc in field_docs(cls).items():
            assert re.search(rf"^  {section}\.{name}:?\s.*{re.escape(doc)}$", pretrain_help, re.M), (section, name)


def test_help_for_one_section_with_overrides_applied():
    proc = run_recipe("recipes.pretrain", ["model=125m", "--help", "model"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("model: ")
    assert _row(proc.stdout, "model.dim", "int", "768")
    assert "\n  training." not in proc.stdout and "config groups" not in proc.stdout


def test_help_training_shows_only_that_section():
    proc = run_recipe("recipes.pretrain", ["--help", "training"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    keys = {line.split()[0].rsplit(".", 1)[0] for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert keys == {"training", "training.health"}  # its nested section comes with it
    assert _row(proc.stdout, "training.global_batch_size", "int", "16")


def test_unknown_help_section_exits_2_naming_the_sections():
    proc = run_recipe("recipes.pretrain", ["--help", "trainin"], timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "'trainin'" in proc.stderr
    assert "model data training optim lr eval parallel checkpoint logging profile debug run" in proc.stderr


# ---------------------------------------------------------------- the other entry points

def test_prepare_data_help_shows_its_own_keys_and_the_data_group():
    proc = run_recipe("recipes.prepare_data", ["--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = field_docs(PrepareDataConfig)
    assert _row(proc.stdout, "out", "str", "??? (required)") == docs["out"]
    assert _row(proc.stdout, "shard_tokens", "int", "50000000") == docs["shard_tokens"]
    assert _row(proc.stdout, "data.source", "str", "pydoc") == field_docs(titan.config.DataConfig)["source"]
    assert re.search(r"^  data\s+hf \| jsonl \| mix \| parquet \| pydoc \(default\) \| text \| tokens$", proc.stdout, re.M)


def test_export_help_shows_its_keys():
    proc = run_recipe("recipes.export", ["--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = field_docs(ExportConfig)
    assert _row(proc.stdout, "checkpoint", "str", "??? (required)") == docs["checkpoint"]
    assert _row(proc.stdout, "max_shard_gb", "float", "5.0") == docs["max_shard_gb"]
    assert _row(proc.stdout, "overwrite", "bool", "false") == docs["overwrite"]
    assert run_recipe("recipes.export", ["--help", "model"], timeout=120).returncode == 2


def test_launch_help_explains_every_option_and_the_overrides():
    assert [a.dest for a in _parser()._actions if not a.help] == []
    proc = subprocess.run([sys.executable, "-m", "launch", "--help"], capture_output=True, text=True, timeout=60,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert "[run|slurm|k8s]" in proc.stdout and "key=value" in proc.stdout and "group=option" in proc.stdout
    imported = subprocess.run([sys.executable, "-c", "import sys, launch.cli; "
                               "print(sorted({m.split('.')[0] for m in sys.modules} & {'titan', 'recipes'}))"],
                              capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert imported.stdout.strip() == "[]", imported.stderr
