"""The serving ecosystem's protocols on the model server: Open Inference Protocol v2 and TF Serving REST."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...web.app import App

if TYPE_CHECKING:
    from .served import ModelServer


def add_routes(app: App, server: ModelServer) -> None:
    """Add both protocols' routes for `server`'s model, named by --model-name, and count its statistics."""
    # Imported here, not above, so that the balancer can use .wire without loading the model code.
    from . import oip, tfserving
    from .served import Served
    from .stats import ModelStats

    stats = ModelStats()
    stats.watch(server.batcher)
    served = Served(server, server.settings.model_name, stats)
    oip.add_routes(app, served)
    tfserving.add_routes(app, served)
