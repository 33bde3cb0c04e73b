"""`loopserve-edge serve`: an OpenAI-compatible HTTP server whose dialogues persist.

Layers, each importing only those before it: protocol.py (request and response shapes),
metrics.py, store.py (dialogues found from stateless requests, state files), engine.py (one
model, requests in turn), app.py (the HTTP routes).
"""
