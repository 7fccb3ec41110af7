"""The ``sparsam`` subcommands, one module per command (train, demo, sweep, report, analyze).

Each module has ``main(argv, prog) -> int``; ``sparsam.__main__`` dispatches to it by name.
"""
