"""Typer command-line interface: one file per command, thin over the library."""
