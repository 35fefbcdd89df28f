"""`loramix serve`: the OpenAI-compatible server.

- `settings`: ServeSettings, the verb's flags as one checked value;
- `scheduler`: the continuous-batching engine (one background thread, no HTTP);
- `protocol`: request bodies checked into typed options against one table of field ranges, errors in OpenAI's shape;
- `responses`: answers built from the engine's events, whole or as stream chunks;
- `state`: what a running server holds (model, tokenizer, engine, limits, requests in flight);
- `admission`: whether a request fits the server (body size, model, rows, prompt length);
- `requests`: one API call on the engine, submitted, collected or streamed, cancelled;
- `completions`, `chat`: one module per API, reading its request and building its prompts;
- `app`: the FastAPI app, its thin routes and error bodies, on uvicorn.
"""
