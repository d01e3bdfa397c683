"""The gRPC API contract, generated from protos/ by metarec_server.codegen."""
