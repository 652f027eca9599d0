"""The one error a model that cannot be served raises: its message names the architecture and
what to do, and the shard prints it as one line (shard/cli.py)."""


class UnsupportedModel(ValueError):
    pass
