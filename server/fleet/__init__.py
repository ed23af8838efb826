"""`loraplex fleet`: many loraplex engines behind one address on Ray Serve.

Each Ray Serve replica runs one engine on the shared adapter store; Ray's gRPC proxy serves the
unchanged `loraplex.v1` services, and model multiplexing routes a request to a replica that
already holds its adapter (the SDK sends the adapter id as `multiplexed_model_id`). See
docs/fleet.md. Nothing here is imported by `loraplex serve`; Ray is needed only for the fleet.
"""
