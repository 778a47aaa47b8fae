"""modelyard's router: one OpenAI-compatible endpoint in front of one child process per model."""
