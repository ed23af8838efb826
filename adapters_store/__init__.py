"""loraplex.adapters_store: adapter registry, blob store, validation and upload assembly."""
