"""Exit 0 when a Kafka broker answers a Metadata request with a live broker and controller.

Standard library only, so `scripts/infra` can check readiness before any virtualenv exists.
An open port is not readiness: a KRaft broker accepts connections before it has registered
with its controller, and clients then fail with "no brokers available".
"""

import socket
import struct
import sys

METADATA_API_KEY = 3
METADATA_VERSION = 1  # v1 is the first to report the controller id; Kafka 3.9 serves it.


def _string(value: bytes) -> bytes:
    return struct.pack(">h", len(value)) + value


def _read_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        data += chunk
    return data


def metadata(host: str, port: int) -> tuple[int, int]:
    """Returns (number of brokers, controller id) as the broker reports them."""
    header = struct.pack(">hhi", METADATA_API_KEY, METADATA_VERSION, 1) + _string(b"infra-ready")
    body = struct.pack(">i", 0)  # an empty topic list: we only want the brokers
    request = header + body
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _read_exact(sock, 4))
        payload = _read_exact(sock, size)
    offset = 4  # correlation id
    (brokers,) = struct.unpack_from(">i", payload, offset)
    offset += 4
    for _ in range(brokers):
        offset += 4  # node id
        (host_len,) = struct.unpack_from(">h", payload, offset)
        offset += 2 + host_len + 4  # host, port
        (rack_len,) = struct.unpack_from(">h", payload, offset)
        offset += 2 + max(rack_len, 0)
    (controller,) = struct.unpack_from(">i", payload, offset)
    return brokers, controller


def main() -> int:
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"
    host, _, port = address.rpartition(":")
    try:
        brokers, controller = metadata(host, int(port))
    except (OSError, struct.error) as exc:
        print(f"kafka not ready: {exc}", file=sys.stderr)
        return 1
    if brokers < 1 or controller < 0:
        print(f"kafka not ready: brokers={brokers} controller={controller}", file=sys.stderr)
        return 1
    print(f"kafka ready: brokers={brokers} controller={controller}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
