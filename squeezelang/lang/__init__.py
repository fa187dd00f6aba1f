"""The recipe language: grammar loading, AST, units and diagnostics."""
