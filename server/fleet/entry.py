"""Ray Serve application builder for `serve deploy` / KubeRay (import path
`loraplex.server.fleet.entry:app`; see deploy/rayservice.yaml).

Settings come from the replicas' LORAPLEX_* environment (the same variables `loraplex serve`
and `loraplex fleet` read), overridden by the Serve config's `args` (keys: flag names such as
`max-loras` or `max_loras`). The Serve config's own deployment options (num_replicas,
ray_actor_options, ...) override the ones derived here.
"""

from __future__ import annotations

import os
from typing import Any

from .app import build_app
from .config import load_fleet_config


def app(args: dict[str, Any] | None = None):
    values = {str(key).replace("-", "_"): value for key, value in (args or {}).items()}
    config, options = load_fleet_config(values, os.environ)
    return build_app(config, options)
