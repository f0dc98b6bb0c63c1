"""The router process: admits client requests and dispatches them to worker processes."""

from router.router import Router

__all__ = ["Router"]
