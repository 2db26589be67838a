"""The kubellm inference runtime: engine, models, kernels and the OpenAI-compatible server."""
