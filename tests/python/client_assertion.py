"""A SMART backend-services client, signing with PyJWT + cryptography (a JOSE implementation
independent of the server's josekit).

  python3 client_assertion.py keygen DIR [ES384|RS384] [KID]   -> DIR/key.pem, DIR/jwks.json
  python3 client_assertion.py sign DIR CLIENT_ID AUD [--exp-in S] [--jti J] [--alg A]
"""
import json
import sys
import time
import uuid

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def keygen(d, alg, kid="k1"):
    if alg == "ES384":
        key = ec.generate_private_key(ec.SECP384R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    open(f"{d}/kid", "w").write(kid)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    open(f"{d}/key.pem", "wb").write(pem)
    open(f"{d}/alg", "w").write(alg)
    json.dump({"keys": [jwk]}, open(f"{d}/jwks.json", "w"))


def sign(d, client_id, aud, args):
    opts = dict(zip(args[::2], args[1::2]))
    alg = opts.get("--alg", open(f"{d}/alg").read().strip())
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": aud,
              "exp": now + int(opts.get("--exp-in", "240")),
              "jti": opts.get("--jti", str(uuid.uuid4()))}
    key = open(f"{d}/key.pem", "rb").read()
    print(jwt.encode(claims, key, algorithm=alg, headers={"kid": open(f"{d}/kid").read().strip()}))


if __name__ == "__main__":
    if sys.argv[1] == "keygen":
        keygen(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "ES384",
               sys.argv[4] if len(sys.argv) > 4 else "k1")
    else:
        sign(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
