"""Subcommands of ``crasmra`` that use trained models, one module each.

Every module here defines ``register(subparsers)``, which adds its argparse subparser and sets
``func`` to a handler taking the parsed namespace and returning an exit code. ``crasmra.cli``
discovers the modules, so adding a command is adding a module.
"""
