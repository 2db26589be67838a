"""Speculative decoding: cheap proposers guess the next tokens, one forward pass verifies them.

``config.py`` (torch-free: the CLI and the operator read it), ``ngram.py`` (prompt lookup), ``suffix.py`` (other
requests' tokens), ``draft_model.py`` (a smaller model with its own KV cache), ``speculator.py`` (the engine's side:
proposals per sequence, acceptance counters), ``verify.py`` (the sampler rows of a verification)."""
