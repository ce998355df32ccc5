"""The HTTP gateway: OpenAI's and Anthropic's APIs onto the daemon's turns layer.

Off unless ``mlxkvd serve --http HOST:PORT``. It serves the same ``Turns`` as the gRPC
service (same engine, same cache store, same conversations); each API request resends the
whole history, and ``Turns.submit_stateless`` maps it to the stored conversation it continues.

Modules: ``server`` (the listening address and the uvicorn thread), ``app`` (the Starlette app:
API key, body cap, routes, errors), ``auth`` (the key file), ``errors`` (one table of errors, in
each API's shape), ``gateway`` (what both APIs share: model identity, limits, turns as async
events), ``fields`` (typed access to a JSON body), ``openai_api`` (Chat Completions),
``responses_api`` (Responses), ``anthropic_api``, ``warm_api`` (warm-ups).
"""
