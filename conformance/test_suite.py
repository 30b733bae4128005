#!/usr/bin/env python3
"""The suite's own tests: its checks fail against deliberately non-conformant fakes (built
here, never in the product) and its validator rejects invalid resources."""

import http.server
import json
import threading
import types
import unittest

import suite


def fake_server(routes):
    """A loopback HTTP server answering GET path -> (status, headers, body)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, headers, body = routes.get(self.path.split("?")[0], (404, {}, {}))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/fhir"


def server_for(base):
    args = types.SimpleNamespace(base=base, admin_token="t", client_id="inferno")
    return suite.Server(args)


GOOD_CONFIG = {
    "authorization_endpoint": "http://x/auth/authorize", "token_endpoint": "http://x/auth/token",
    "capabilities": ["launch-standalone"], "grant_types_supported": ["authorization_code"],
    "code_challenge_methods_supported": ["S256"],
}


class AgainstFakes(unittest.TestCase):
    def run_check(self, routes, *checks, state=None):
        httpd, base = fake_server(routes)
        s = server_for(base)
        try:
            s.state.update(state or {})
            for c in checks:
                c(s)
        finally:
            s.http.close()
            httpd.shutdown()
            httpd.server_close()

    def test_a_conformant_discovery_passes(self):
        routes = {"/fhir/.well-known/smart-configuration": (200, {"Content-Type": "application/json"}, GOOD_CONFIG)}
        self.run_check(routes, suite.well_known, suite.well_known_fields)

    def test_offering_plain_pkce_fails_exactly_the_capabilities_check(self):
        bad = dict(GOOD_CONFIG, code_challenge_methods_supported=["S256", "plain"])
        routes = {"/fhir/.well-known/smart-configuration": (200, {"Content-Type": "application/json"}, bad)}
        self.run_check(routes, suite.well_known)
        with self.assertRaises(suite.Failure):
            self.run_check(routes, suite.well_known, suite.well_known_fields)

    def test_a_server_that_serves_without_a_token_fails(self):
        routes = {"/fhir/Patient/p1": (200, {"Content-Type": "application/fhir+json"}, {"resourceType": "Patient", "id": "p1"})}
        with self.assertRaises(suite.Failure):
            self.run_check(routes, suite.no_token, state={"patient_id": "p1"})

    def test_a_configuration_served_as_html_fails(self):
        routes = {"/fhir/.well-known/smart-configuration": (200, {"Content-Type": "text/html"}, GOOD_CONFIG)}
        with self.assertRaises(suite.Failure):
            self.run_check(routes, suite.well_known)

    def test_invalid_resources_the_server_emits_fail_validation(self):
        routes = {"/fhir/metadata": (200, {"Content-Type": "application/fhir+json"},
                                     {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                                      "fhirVersion": "4.0.1", "format": ["json"], "date": "not a date", "rest": []})}
        with self.assertRaises(suite.Failure):
            self.run_check(routes, suite.capability)


class Validator(unittest.TestCase):
    def test_valid_resources_pass(self):
        suite.validate_resource({"resourceType": "Patient", "id": "p", "birthDate": "1970-01-01",
                                 "name": [{"family": "X"}]})

    def test_wrong_types_and_unknown_elements_fail(self):
        for bad in [
            {"resourceType": "Patient", "birthDate": 1970},
            {"resourceType": "Patient", "nickname": "x"},
            {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {"resourceType": "Patient", "active": "yes"}}]},
        ]:
            with self.assertRaises(suite.Failure, msg=json.dumps(bad)):
                suite.validate_resource(bad)


if __name__ == "__main__":
    unittest.main()
