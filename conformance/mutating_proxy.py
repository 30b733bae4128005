#!/usr/bin/env python3
"""A loopback proxy in front of a real Fhirmament that breaks one or two behaviours on purpose,
so the suite's own test can show that exactly the checks about them fail. Test tooling only;
nothing like it exists in the product.

  mutating_proxy.py LISTEN_PORT UPSTREAM_PORT MUTATION[,MUTATION]

Mutations: `pragma` drops `Pragma: no-cache` from token responses; `plain` advertises plain
PKCE in the SMART configuration.
"""

import http.client
import http.server
import json
import sys

listen, upstream, mutations = int(sys.argv[1]), int(sys.argv[2]), set(sys.argv[3].split(","))


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def relay(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "accept-encoding")}
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError:  # the server is not up yet
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        out_headers = [(k, v) for k, v in resp.getheaders()
                       if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")]
        if "plain" in mutations and self.path.endswith("/.well-known/smart-configuration"):
            doc = json.loads(data)
            doc["code_challenge_methods_supported"] = doc.get("code_challenge_methods_supported", []) + ["plain"]
            data = json.dumps(doc).encode()
        if "pragma" in mutations and self.path.endswith("/auth/token"):
            out_headers = [(k, v) for k, v in out_headers if k.lower() != "pragma"]
        self.send_response(resp.status)
        for k, v in out_headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = relay

    def log_message(self, *a):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", listen), Proxy).serve_forever()
