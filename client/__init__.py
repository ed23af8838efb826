"""loraplex.client: Python SDK for the loraplex gRPC server."""
