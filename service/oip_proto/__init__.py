"""The Open Inference Protocol's gRPC messages and service: grpc_predict_v2.proto and the code grpc_tools.protoc
generated from it (regenerate with the command in the .proto; tests/test_oip_clients.py checks it is current)."""
