"""Every `baton` subcommand; `engine.cli:main` is the `baton` entry point."""
from engine.cli.baton import main

__all__ = ["main"]
