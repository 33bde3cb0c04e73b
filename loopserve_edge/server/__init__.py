"""`loopserve-edge serve`: an OpenAI-compatible HTTP server whose dialogues persist.

Below it in the package: openai_api.py and responses_api.py (request and response shapes;
grammar.py and tool_calls.py the forms a reply is held to) and dialogue_store.py
(dialogues found from stateless requests, state files), which `Llama.create_chat_completion`
uses too. Here, each importing only those before it: protocol.py (error bodies, events),
responses_store.py (stored Responses), metrics.py, engine.py (one model, requests in turn),
app.py (the HTTP routes).
"""
