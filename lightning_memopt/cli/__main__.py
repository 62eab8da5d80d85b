"""``python -m lightning_memopt.cli``: the ``memopt`` command."""

from lightning_memopt.cli import main

main()
