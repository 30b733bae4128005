"""A SMART standalone patient launch driven by SMART's Python fhirclient, unmodified: it reads
the CapabilityStatement's OAuth URIs, builds the authorize URL (state, aud, PKCE S256),
exchanges the code and then reads FHIR resources with the token. This script only plays the
browser: it submits the login and approval forms.

Usage: python3 smart_launch.py BASE REDIRECT USER PASSWORD OWN_PATIENT OTHER_PATIENT
"""
import html
import re
import sys

import requests
from fhirclient import client
from fhirclient.server import FHIRUnauthorizedException, FHIRPermissionDeniedException
import fhirclient.models.patient as pat


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def form(page):
    action = html.unescape(re.search(r'<form method="post" action="([^"]+)"', page).group(1))
    txn = re.search(r'name="txn" value="([^"]+)"', page).group(1)
    return action, txn


def main(base, redirect, user, password, own, other):
    smart = client.FHIRClient(settings={
        "app_id": "app", "api_base": base, "redirect_uri": redirect,
        "scope": "launch/patient openid fhirUser offline_access patient/*.rs",
    })
    url = smart.authorize_url
    check("code_challenge_method=S256" in url and "aud=" in url, f"authorize URL {url}")

    browser = requests.Session()
    page = browser.get(url, allow_redirects=False)
    check(page.status_code == 200, f"login page: {page.status_code}")
    action, txn = form(page.text)
    page = browser.post(action, data={"txn": txn, "username": user, "password": password})
    check("Approve" in page.text, "approval page")
    action, txn = form(page.text)
    scopes = re.findall(r'name="scope" value="([^"]+)"', page.text)
    done = browser.post(action, data={"txn": txn, "scope": scopes, "decision": "approve"},
                        allow_redirects=False)
    check(done.status_code == 302, f"approval redirect: {done.status_code}")

    smart.handle_callback(done.headers["Location"])
    check(smart.ready, "fhirclient holds an access token")
    check(smart.patient_id == own, f"patient in context {smart.patient_id}")
    me = pat.Patient.read(own, smart.server)
    check(me.id == own, "read the patient's own record")
    try:
        pat.Patient.read(other, smart.server)
        check(False, "another patient's record was served")
    except (FHIRUnauthorizedException, FHIRPermissionDeniedException, requests.exceptions.HTTPError):
        pass
    bundle = pat.Patient.where(struct={}).perform(smart.server)
    check([e.resource.id for e in bundle.entry or []] == [own], "search sees only the patient")
    print("smart launch: ok")


if __name__ == "__main__":
    main(*sys.argv[1:7])
