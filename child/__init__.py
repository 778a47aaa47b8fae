"""modelyard's inference process: one GGUF model behind an OpenAI-compatible HTTP server."""
