"""Assemble the gRPC server: the Inference service, health checking and reflection."""

from __future__ import annotations

import os
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mlxkv.v1 import inference_pb2, inference_pb2_grpc

from .engine import Engine
from .models import ModelHost
from .service import InferenceService

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


def create_server(
    engine: Engine,
    models: ModelHost,
    socket_path: Path,
    *,
    default_max_tokens: int = 512,
    max_message_bytes: int = 16 * 1024 * 1024,
    max_workers: int = 32,
) -> tuple[grpc.Server, health.HealthServicer, InferenceService]:
    """A server (not yet started) bound to ``unix://socket_path``, mode 0600, with its health
    servicer and the Inference servicer (whose defaults SIGHUP may change)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="mlxkv-rpc"),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    service = InferenceService(
        engine, models, default_max_tokens=default_max_tokens, socket_path=str(socket_path)
    )
    inference_pb2_grpc.add_InferenceServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    # The socket is created by bind: a umask of 0177 makes it 0600 from its first instant.
    old = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix://{socket_path}")
    finally:
        os.umask(old)
    return server, health_servicer, service
