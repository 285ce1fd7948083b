"""The gRPC code generated from proto/featurestore/v1 when the package is built."""
