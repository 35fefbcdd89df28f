"""`loramix serve`: the OpenAI-compatible server.

- `scheduler`: the continuous-batching engine (one background thread, no HTTP);
- `protocol`: request bodies checked and turned into engine values, errors in OpenAI's shape;
- `responses`: answers built from the engine's events, whole or as stream chunks;
- `app`: the FastAPI app and its routes.
"""
