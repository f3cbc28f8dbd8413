"""Staged training of EmoCAST (run from the repository root: `python -m training ...`)."""
