"""Calls bench.Echo with grpcio over one channel (one HTTP/2 connection): N calls of each
method named on the command line, each with its own x-request-id. Prints one line per method:
`<method> <calls> <ok> <failed>`."""

import sys

import grpc


def main():
    port, tag = int(sys.argv[1]), sys.argv[2]
    plan = [(arg.split("=")[0], int(arg.split("=")[1])) for arg in sys.argv[3:]]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for method, n in plan:
            ok = failed = 0
            path = f"/bench.Echo/{method}"
            call = (
                channel.unary_stream(path)
                if method == "Stream"
                else channel.unary_unary(path)
            )
            for i in range(n):
                metadata = (("x-request-id", f"{tag}-{method}-{i}"),)
                try:
                    result = call(b"x" * 100, metadata=metadata, timeout=10)
                    if method == "Stream":
                        result = list(result)
                    ok += 1
                except grpc.RpcError:
                    failed += 1
            print(method, n, ok, failed, flush=True)


if __name__ == "__main__":
    main()
