"""The OpenAI-compatible HTTP API: protocol (requests, responses), routes (the Starlette app), metrics."""

from jaxinfer.api.routes.app import create_app

__all__ = ["create_app"]
