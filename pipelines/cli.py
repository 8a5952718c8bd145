"""The launcher: the first vitok module every entry point imports, and its command line.

``ray job submit --working-dir . -- python pipelines/scaling_study.py`` must run the code the
job shipped, not the copy installed on the node (see ``vitok.platform.runtime``), so
``use_shipped_code()`` has to run before any other vitok module is imported. Importing this
module does that, and only then loads what it hands on (the shared options of
``vitok.pipelines.arguments``, the presets, the root config): in a Ray job those are the
shipped code too. An entry point starts its vitok imports with it::

    from vitok.pipelines.cli import config_from_args, config_parser   # first: maps the code
    from vitok.pipelines.tokenizer_stage import run_tokenizer          # then the rest

``from vitok.pipelines.cli`` sorts ahead of every other vitok import the entry points make
(``tests/test_foundation.py`` checks that it stays first), so the imports stay ordinary
ones at the top of the file, with no code in between.

In a Ray job this module is itself loaded from the installed copy, before the mapping: it
holds no logic of its own, only the mapping and the names it passes on.
"""

from __future__ import annotations

import importlib

from vitok.platform.runtime import use_shipped_code

# The shipped repo this process runs, or None outside a Ray job (the installed copy is the code).
SHIPPED_ROOT = use_shipped_code(importing=__name__)

_arguments = importlib.import_module("vitok.pipelines.arguments")
_experiment = importlib.import_module("vitok.pipelines.experiment")
_presets = importlib.import_module("vitok.pipelines.presets")

ExperimentConfig = _experiment.ExperimentConfig
dump_config = _experiment.dump_config
PRESETS = _presets.PRESETS
preset = _presets.preset
add_config_arguments = _arguments.add_config_arguments
add_overrides_argument = _arguments.add_overrides_argument
config_from_args = _arguments.config_from_args
config_parser = _arguments.config_parser
print_run_summary = _arguments.print_run_summary
resolve_config = _arguments.resolve_config
show_config = _arguments.show_config
with_data = _arguments.with_data

__all__ = [
    "PRESETS",
    "SHIPPED_ROOT",
    "ExperimentConfig",
    "add_config_arguments",
    "add_overrides_argument",
    "config_from_args",
    "config_parser",
    "dump_config",
    "preset",
    "print_run_summary",
    "resolve_config",
    "show_config",
    "with_data",
]
