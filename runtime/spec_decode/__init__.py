"""Speculative decoding: cheap proposers guess the next tokens, one forward pass verifies them.

``config.py`` (torch-free: the CLI and the operator read it), ``ngram.py`` (prompt lookup), ``speculator.py`` (the
engine's side: proposals per sequence, acceptance counters).
"""
