"""gRPC transport: servicers that only translate protobuf <-> domain, the status table, health."""
