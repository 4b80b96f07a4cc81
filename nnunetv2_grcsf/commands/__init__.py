"""Subcommands of the ``nnunetv2_grcsf`` command line; each module has ``add_parser`` and ``run``."""
