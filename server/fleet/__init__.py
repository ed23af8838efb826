"""`loraplex fleet`: many loraplex engines behind one address on Ray Serve.

Each Ray Serve replica runs one engine on the shared adapter store; loraplex's own front end
(front.py) serves the unchanged `loraplex.v1` services and the OpenAI HTTP API on --host with
`serve`'s limits, and Ray's model multiplexing routes a request to a replica that already holds
its adapter (the front end passes a digest of the request's adapter as `multiplexed_model_id`). See
docs/fleet.md. Nothing here is imported by `loraplex serve`; Ray is needed only for the fleet.
"""
