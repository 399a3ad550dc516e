"""A DNS server on loopback for tests: answers TXT queries from a table (the DKIM keys a test
publishes), NXDOMAIN for anything else. Real UDP on 127.0.0.1, port 0, built on dnspython's
message API, so that the gateway's resolver code runs as it would against a real server."""

from __future__ import annotations

import socket
import threading

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class TxtServer:
    def __init__(self, records: dict[str, str] | None = None, port: int = 0) -> None:
        self.records: dict[str, str] = {}
        for name, value in (records or {}).items():
            self.publish(name, value)
        self.queries: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", port))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns-test-server", daemon=True)

    def publish(self, name: str, value: str) -> None:
        self.records[name.lower().rstrip(".") + "."] = value

    def __enter__(self) -> TxtServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text().lower()
            self.queries.append(name)
            value = self.records.get(name)
            if value is None or question.rdtype != dns.rdatatype.TXT:
                response.set_rcode(dns.rcode.NXDOMAIN)
            else:
                # TXT strings are at most 255 bytes each: a long key is split, as zone files do
                chunks = [value[i : i + 255] for i in range(0, len(value), 255)]
                text = " ".join(f'"{c}"' for c in chunks)
                response.answer.append(
                    dns.rrset.from_text(question.name, 300, dns.rdataclass.IN, "TXT", text)
                )
            self._sock.sendto(response.to_wire(), peer)
