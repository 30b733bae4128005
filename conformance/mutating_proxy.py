#!/usr/bin/env python3
"""A loopback proxy in front of a real Fhirmament that breaks one or two behaviours on purpose,
so the suite's own test can show that exactly the checks about them fail. Test tooling only;
nothing like it exists in the product.

  mutating_proxy.py LISTEN_PORT UPSTREAM_PORT MUTATION[,MUTATION]

Mutations, each a behaviour a non-conformant server might have:
- `plain` advertises plain PKCE in the SMART configuration;
- `pragma` drops `Pragma: no-cache` from token responses;
- `plain-pkce` accepts `code_challenge_method=plain` (it turns the challenge into the S256
  challenge of the same verifier before the server sees it);
- `aud` ignores the `aud` of authorize requests (it puts the server's own base there);
- `revoke` answers revocation requests with 200 without revoking anything;
- `scopes` grants every resource type (it widens `patient/<Type>.rs` to `patient/*.rs`);
- `receipt` hands out `$verify` receipts whose entry was changed after the server proved it.
"""

import base64
import hashlib
import http.client
import http.server
import json
import re
import sys
import urllib.parse

listen, upstream, mutations = int(sys.argv[1]), int(sys.argv[2]), set(sys.argv[3].split(","))


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def authorize_query(self, path):
        """The authorize request as the mutations rewrite it."""
        url = urllib.parse.urlsplit(path)
        if not url.path.endswith("/auth/authorize"):
            return path
        q = dict(urllib.parse.parse_qsl(url.query))
        if "plain-pkce" in mutations and q.get("code_challenge_method") == "plain":
            digest = hashlib.sha256(q["code_challenge"].encode()).digest()
            q["code_challenge"] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
            q["code_challenge_method"] = "S256"
        if "aud" in mutations and "aud" in q:
            q["aud"] = f"http://{self.headers.get('Host')}{url.path[:-len('/auth/authorize')]}"
        if "scopes" in mutations and "scope" in q:
            q["scope"] = re.sub(r"\bpatient/[A-Z][A-Za-z]*\.rs(?=\s|$)", "patient/*.rs", q["scope"])
        return urllib.parse.urlunsplit(url._replace(query=urllib.parse.urlencode(q)))

    def relay(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if "revoke" in mutations and self.path.endswith("/auth/revoke"):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = self.authorize_query(self.path)
        conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "accept-encoding")}
        try:
            conn.request(self.command, path, body=body, headers=headers)
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
        if "receipt" in mutations and "$verify" in urllib.parse.unquote(self.path) and resp.status == 200:
            doc = json.loads(data)
            for p in doc.get("parameter", []):
                if p["name"] == "entry":
                    entry = bytearray(base64.b64decode(p["valueBase64Binary"]))
                    entry[0] ^= 0x01
                    p["valueBase64Binary"] = base64.b64encode(bytes(entry)).decode()
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
