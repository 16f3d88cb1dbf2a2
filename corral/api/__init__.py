"""The gRPC edge: TLS, authentication, error mapping and protobuf conversion."""
