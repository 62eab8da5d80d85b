"""``memopt estimate``: per-device peak training memory of a recipe, before launching it.

Reads the same configs as ``memopt fit`` (nothing is instantiated and no weights are read: only the
model's ``config.json``), simulates one training step on the meta device, and prints a table of the
per-device peak under each strategy and device count, the breakdown for the configured setting, and,
given ``--device_memory``, the cheapest setting that fits.

    memopt estimate --config recipes/ner/conll2003.yaml --trainer.devices 2 --device_memory 16GiB
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule

from lightning_memopt.cli.fit import MemoptCLI
from lightning_memopt.estimate.report import estimate_report, load_model_config, parse_size, setup_from_config


def estimate_command(argv: Sequence[str]) -> None:
    """``memopt estimate``: predict per-device peak training memory for a ``memopt fit`` config."""
    own = argparse.ArgumentParser(prog="memopt estimate", add_help=False)
    own.add_argument("--device_memory", default=None, help="memory per device, e.g. 16GiB: recommend a setting")
    known, rest = own.parse_known_args(list(argv))
    device_memory = parse_size(known.device_memory) if known.device_memory else None

    class ConfigOnly(MemoptCLI):
        def instantiate_classes(self) -> None:  # read the config, build nothing
            pass

    argv_before, sys.argv = sys.argv, [f"{sys.argv[0]} estimate", *rest]  # LightningCLI reads sys.argv
    try:
        cli = ConfigOnly(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            parser_kwargs={"prog": "memopt estimate", "description": __doc__, "exit_on_error": False},
        )
    finally:
        sys.argv = argv_before
    setup = setup_from_config(cli.config)  # a bad setting is a ValueError: memopt prints it as one line
    print(estimate_report(setup, load_model_config(setup.model, setup.num_labels), device_memory))
