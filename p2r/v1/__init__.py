"""Generated gRPC stubs of the p2r.v1 contract (proto/p2r/v1/*.proto); built by setup.py, not committed."""
