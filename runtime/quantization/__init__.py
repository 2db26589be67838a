"""Weight formats of the decoder linears: one module per format, a registry keyed by vLLM's ``quant_method``
names (registry.py), the interface in base.py."""
