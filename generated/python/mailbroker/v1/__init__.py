"""Generated gRPC stubs for mailbroker.v1 (do not edit)."""
