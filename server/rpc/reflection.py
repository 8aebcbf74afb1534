"""gRPC server reflection, served as both `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

grpcio-reflection (up to 1.85 at least) ships only v1alpha. Tools that speak only v1 (recent
grpcui, Postman, Kreya, grpc-java's and grpc-go's newer reflection clients) get UNIMPLEMENTED
from a v1alpha-only server, and grpcurl pays a failed call before falling back. The two
protocols are the same proto under another package name: the same messages with the same
field numbers, so v1alpha's messages read and write v1's bytes, and the library's servicer
answers both. What v1 needs beyond that is its own descriptor, so that a client describing
`grpc.reflection.v1.ServerReflection` finds it: it is derived here from v1alpha's (renamed,
nothing copied in by hand) and added to the default descriptor pool, which the servicer reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as alpha
from grpc_reflection.v1alpha import reflection_pb2_grpc as alpha_grpc

__all__ = ["SERVICE_NAMES", "add_reflection"]

V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
SERVICE_NAMES = (V1_SERVICE, reflection.SERVICE_NAME)


def add_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection of `service_names` (the reflection services themselves are added) under
    both protocol versions on `server`."""
    _add_v1_descriptor(descriptor_pool.Default())
    servicer = reflection.aio.ReflectionServicer((*service_names, *SERVICE_NAMES))
    alpha_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=alpha.ServerReflectionRequest.FromString,
            response_serializer=alpha.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, handlers),))
    server.add_registered_method_handlers(V1_SERVICE, handlers)


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Add v1's file descriptor to `pool`: v1alpha's, under v1's file and package names. Once
    per process (a second app in the same process finds it there)."""
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    alpha.DESCRIPTOR.CopyToProto(fdp)
    old, new = f".{fdp.package}.", f".{V1_PACKAGE}."

    def renamed(type_name: str) -> str:
        return new + type_name.removeprefix(old)

    fdp.name, fdp.package = V1_FILE, V1_PACKAGE
    fdp.ClearField("options")  # (v1alpha's language options name v1alpha's packages)
    for message in fdp.message_type:
        for field in message.field:
            if field.type_name.startswith(old):  # (a scalar has none: left unset)
                field.type_name = renamed(field.type_name)
    for service in fdp.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    pool.Add(fdp)
