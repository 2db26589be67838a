"""The OpenAI-compatible HTTP / SSE / WebSocket server (`kubellm serve`): app.py routes, protocol.py schema."""
