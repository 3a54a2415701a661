"""Errors a user can act on: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Base class: bad config, missing data, corrupt shard or checkpoint, ..."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or does not match the requested architecture."""
