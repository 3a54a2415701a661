"""One module per `biflow` subcommand (discovered by biflow.cli)."""
