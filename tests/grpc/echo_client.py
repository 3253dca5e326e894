"""Calls bench.Echo with grpcio over one channel (one HTTP/2 connection): N calls of each
method named on the command line, each with its own x-request-id. Prints one line per method:
`<method> <calls> <ok> <failed>`.

With ECHO_WARMUP="Method=n,..." it first makes those calls (ids `warm-<method>-<i>`), prints
`paused` and waits for a line on stdin before the plan: a test attaches the probe in between,
to a connection whose HPACK tables already hold entries."""

import os
import sys

import grpc


def main():
    port, tag = int(sys.argv[1]), sys.argv[2]
    plan = [(arg.split("=")[0], int(arg.split("=")[1])) for arg in sys.argv[3:]]
    warmup = [
        (arg.split("=")[0], int(arg.split("=")[1]))
        for arg in os.environ.get("ECHO_WARMUP", "").split(",")
        if arg
    ]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        if warmup:
            run(channel, "warm", warmup, report=False)
            print("paused", flush=True)
            sys.stdin.readline()
        run(channel, tag, plan, report=True)


def run(channel, tag, plan, report):
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
        if report:
            print(method, n, ok, failed, flush=True)


if __name__ == "__main__":
    main()
