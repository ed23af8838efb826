"""OpenAI-compatible HTTP API beside gRPC (FastAPI on uvicorn, same process and engine)."""
