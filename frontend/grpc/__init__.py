"""Triton's gRPC API (KServe V2 ``inference.GRPCInferenceService``) served by every HTTP worker.

``serve(settings, client)`` starts the worker's grpc.aio server (RINGSERVE_GRPC_PORT, 0 = off) from
the app's lifespan. It answers through ``frontend.v2``, as the V2 HTTP routes do, with Triton's
gRPC codes; ``grpc.health.v1`` serves Kubernetes probes. The protobuf modules are the ones that
ship in the tritonclient wheel (``tritonclient.grpc.service_pb2``), so the wire is Triton's own.
"""

from frontend.grpc.server import GrpcServer, serve

__all__ = ["GrpcServer", "serve"]
