"""CLI subcommands: each module has ``register(subparsers)`` that adds its parser and sets ``func``.

Commands parse arguments into config objects and call the library API; nothing else.
"""
