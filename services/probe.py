"""``python -m p2r.services.probe``: a gRPC health check for Kubernetes exec probes.

Kubelet's built-in ``grpc`` probe speaks plaintext only, so a server with TLS on every port is
probed from inside its container instead: this connects to the local port with the CA of the
mounted TLS Secret, checks ``grpc.health.v1`` for one service and exits 0 only when it is
SERVING (1 otherwise, with one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from p2r.services.security import ClientCredentials, secure_channel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2r.services.probe")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service", default="", help="health service name; empty: the whole server")
    parser.add_argument("--ca", type=Path, required=True, help="ca.crt of the server's certificate")
    parser.add_argument("--server-name", required=True, help="a name the server certificate holds")
    parser.add_argument("--cert", type=Path, default=None, help="client certificate, when mTLS is required")
    parser.add_argument("--key", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    credentials = ClientCredentials(ca_file=args.ca, cert_file=args.cert, key_file=args.key,
                                    server_name=args.server_name)
    raw, channel = secure_channel(f"127.0.0.1:{args.port}", credentials, [])
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"probe: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        raw.close()
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"probe: {args.service or 'server'} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
