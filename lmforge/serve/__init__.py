"""`lmforge serve`: an OpenAI-compatible gateway over one base model and its LoRA adapters.

protocol.py (wire format) · decoder.py (lean forward, KV cache, LoRA rows) · engine.py (continuous batching thread)
· text.py (detokenize, stop strings) · guard.py (keys, limits, kill switch) · metrics.py · settings.py · loading.py
(what is served) · routes.py · app.py (create_app, run_server) · static/chat.html (the chat page at /).
"""
