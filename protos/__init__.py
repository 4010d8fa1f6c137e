"""edistill wire format: generated gRPC code and the tensor codec."""
