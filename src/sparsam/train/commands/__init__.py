"""The ``sparsam`` subcommands; each module has ``main(argv, prog) -> int`` (see ``sparsam.__main__``)."""
