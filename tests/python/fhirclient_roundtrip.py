"""Drive Fhirmament with SMART's Python fhirclient (R4 models): capability, create, read,
update, search with paging, delete. Exits non-zero with a message on any mismatch.

Usage: FHIRMAMENT_TOKEN=<access token> python3 fhirclient_roundtrip.py BASE_URL
"""
import os
import sys

from fhirclient import client
import fhirclient.models.humanname as hn
import fhirclient.models.identifier as ident
import fhirclient.models.patient as pat
import fhirclient.models.fhirdate as fd


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def main(base):
    smart = client.FHIRClient(settings={"app_id": "fhirmament-e2e", "api_base": base})
    server = smart.server
    # An operator's token (fhirmament token); the SMART launch itself is smart_launch.py.
    server.session.headers["Authorization"] = "Bearer " + os.environ["FHIRMAMENT_TOKEN"]

    server.get_capability(force=True)
    cs = server.capabilityStatement
    check(cs.fhirVersion == "4.0.1", f"fhirVersion {cs.fhirVersion}")
    check([r.type for r in cs.rest[0].resource][:1] == ["Patient"], "Patient in the CapabilityStatement")

    created_ids = []
    for i in range(25):
        p = pat.Patient()
        name = hn.HumanName()
        name.family = "Pyclient"
        name.given = [f"Case{i:02d}"]
        p.name = [name]
        p.gender = "female"
        p.birthDate = fd.FHIRDate("1971-04-1%d" % (i % 10))
        mrn = ident.Identifier()
        mrn.system = "urn:pyclient"
        mrn.value = str(i)
        p.identifier = [mrn]
        response = p.create(server)
        check(response is not None and response.get("id"), "create returned the resource")
        created_ids.append(response["id"])

    first = pat.Patient.read(created_ids[0], server)
    check(first.name[0].family == "Pyclient", "read back the family name")
    check(first.meta.versionId == "1", f"versionId {first.meta.versionId}")

    first.gender = "other"
    first.update(server)
    again = pat.Patient.read(created_ids[0], server)
    check(again.gender == "other" and again.meta.versionId == "2", "update")

    # Search with paging: fhirclient follows `next` links itself.
    search = pat.Patient.where(struct={"family": "pyclient", "_count": "10"})
    found = search.perform_resources(server)
    check(len(found) == 25, f"search with paging found {len(found)} of 25")
    check(sorted(p.id for p in found) == sorted(created_ids), "search returned exactly the created ids")

    one = pat.Patient.where(struct={"identifier": "urn:pyclient|7"}).perform_resources(server)
    check([p.id for p in one] == [created_ids[7]], "token search")

    pat.Patient.read(created_ids[1], server).delete()
    remaining = pat.Patient.where(struct={"family": "pyclient"}).perform_resources(server)
    check(len(remaining) == 24, f"after delete {len(remaining)} remain")
    print("fhirclient round trip: ok")


if __name__ == "__main__":
    main(sys.argv[1])
