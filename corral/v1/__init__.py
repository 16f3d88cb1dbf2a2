"""Generated protobuf/gRPC code of the corral.v1 API (see proto/generate.py)."""
