"""The gRPC companion proxy (docs/grpc.md)."""
