"""A gRPC server built on grpcio (a third-party HTTP/2 and gRPC implementation), with generic
handlers over raw bytes so that no generated code is needed. Service `bench.Echo`:
Fast (echo), Slow (echo after --slow-ms), Fail (UNAVAILABLE), Stream (three echoes)."""

import sys
import time
from concurrent import futures

import grpc


def main():
    port, slow_ms = int(sys.argv[1]), float(sys.argv[2])

    def fast(request, context):
        return request

    def slow(request, context):
        time.sleep(slow_ms / 1000.0)
        return request

    def fail(request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "try later")

    def stream(request, context):
        for _ in range(3):
            yield request

    handlers = {
        "Fast": grpc.unary_unary_rpc_method_handler(fast),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", handlers),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
