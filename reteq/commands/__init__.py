"""The verbs of the `reteq` command, one small module each; `reteq.cli` only parses arguments and calls them.

The top layer: a command may import any module of reteq, and no module outside this package imports one.
Bad input raises `reteq.errors.BadInput`, which the CLI turns into one line per problem and exit 2.
"""
