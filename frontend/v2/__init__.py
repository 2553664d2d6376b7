"""The Open Inference Protocol (KServe V2, Triton's HTTP API) over ringserve's engine.

``make_router(settings)`` gives the worker's V2 routes. They speak V2 errors (``{"error"}`` with
Triton's status codes), not the REST error shape, and share box-wide state (statistics, registered
shared-memory regions) with the other workers through files in the run directory.
"""

from frontend.v2.routes import make_router

__all__ = ["make_router"]
