#!/usr/bin/env python3
"""Security probe: hostile requests against a running service, each with the
answer it must get.

Starts the service (the binary given, default target/debug/ai-secretary) on a
fresh database, stream and key prefix of its own, with the default limits on,
and sends what an attacker or a careless client would: forged and expired
tokens, another user's ids, NUL bytes and control characters in every string
field, absurd dates and parameters, oversized and mistyped bodies, floods of
logins, sign-ups and commands, and "forget me" with and without proof. After
each refused write it checks that nothing was appended. It ends by grepping
the database for the personal data of a forgotten user and for plaintext of a
live one in the event log.

Usage: scripts/security_probe.py [--binary target/release/ai-secretary]
Needs: the servers of the README (Postgres, NATS, Redis) and psql. Prints one
line per probe and exits 0 when every probe got the answer it must.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG = "postgres://postgres@127.0.0.1:5432"
JWT_SECRET = "probe-secret-" + "x" * 40


def request(method, url, body=None, token=None, headers=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None and raw is None:
        req.add_header("content-type", "application/json")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            text = response.read().decode(errors="replace")
            return response.status, text, dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace"), dict(e.headers)


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims, secret=JWT_SECRET, alg="HS256"):
    header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims).encode())
    if alg == "none":
        return f"{header}.{payload}."
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def psql(database, sql):
    return subprocess.run(["psql", "-X", "-A", "-t", "-q", f"{PG}/{database}", "-c", sql],
                          check=True, capture_output=True, text=True).stdout.strip()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Probe:
    def __init__(self, base, database):
        self.base, self.database = base, database
        self.results = []

    def events(self):
        return int(psql(self.database, "SELECT count(*) FROM events"))

    def check(self, name, ok, detail=""):
        self.results.append((name, ok))
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + ("" if ok else f"   [{detail}]"))

    def expect(self, name, method, path, statuses, appends_nothing=False, **kw):
        before = self.events() if appends_nothing else None
        status, text, headers = request(method, self.base + path, **kw)
        ok = status in statuses and status < 500
        if appends_nothing:
            time.sleep(0.05)
            ok = ok and self.events() == before
        if status >= 400:
            ok = ok and "application/problem+json" in headers.get("content-type", headers.get("Content-Type", ""))
            ok = ok and "SELECT" not in text and "sqlx" not in text and "panicked" not in text
        self.check(name, ok, f"{status} {text[:160]}")
        return status, text, headers

    def user(self, email, name="Probe"):
        status, text, _ = request("POST", self.base + "/users",
                                  {"email": email, "password": "correct horse battery", "display_name": name})
        assert status == 201, (status, text)
        status, text, _ = request("POST", self.base + "/auth/token",
                                  {"email": email, "password": "correct horse battery"})
        assert status == 200, (status, text)
        token = json.loads(text)["access_token"]
        me = json.loads(request("GET", self.base + "/users/me", token=token)[1])
        return token, me["id"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", default=os.path.join(ROOT, "target", "debug", "ai-secretary"))
    args = parser.parse_args()
    run = uuid.uuid4().hex[:12]
    database = f"ai_secretary_probe_{run}"
    port = free_port()
    env = dict(os.environ, DATABASE_URL=f"{PG}/{database}", NATS_STREAM=f"PROBE_{run}",
               NATS_SUBJECT_PREFIX=f"probe_{run}.events", REDIS_KEY_PREFIX=f"probe_{run}",
               JWT_SECRET_KEY=JWT_SECRET, BIND=f"127.0.0.1:{port}", LOG_FORMAT="json",
               # The default sign-up bucket holds 3: enough for the flood probe,
               # not for the accounts the other probes need.
               RATE_LIMIT_SIGNUPS_PER_HOUR="600",
               RUST_LOG="warn")
    log = open(os.path.join(ROOT, "target", f"probe-{run}.log"), "w")
    service = subprocess.Popen([args.binary], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                if request("GET", f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        p = Probe(f"http://127.0.0.1:{port}/api/v1", database)
        probes(p, run)
    finally:
        service.terminate()
        service.wait(timeout=30)
        subprocess.run(["psql", "-X", "-q", f"{PG}/postgres", "-c",
                        f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"], capture_output=True)
    failed = [name for name, ok in p.results if not ok]
    print(f"\n{len(p.results)} probes, {len(failed)} failed")
    sys.exit(1 if failed else 0)


def probes(p, run):
    alice, alice_id = p.user(f"alice-{run}@example.com", "Alice")
    bob, bob_id = p.user(f"bob-{run}@example.com", "Bob")
    _, assistant, _ = request("POST", p.base + "/assistants", {"name": "Aide"}, alice)
    assistant = json.loads(assistant)["id"]
    _, conversation, _ = request("POST", p.base + "/conversations", {"assistant_id": assistant}, alice)
    conversation = json.loads(conversation)["id"]
    now = int(time.time())

    # Tokens
    p.expect("no token", "GET", "/assistants", {401})
    p.expect("alg none", "GET", "/assistants", {401},
             token=jwt({"sub": alice_id, "iat": now, "exp": now + 600, "iss": "ai-secretary"}, alg="none"))
    p.expect("foreign key", "GET", "/assistants", {401},
             token=jwt({"sub": alice_id, "iat": now, "exp": now + 600, "iss": "ai-secretary"}, secret="other"))
    head, _, sig = alice.split(".")
    forged = b64(json.dumps({"sub": bob_id, "iat": now, "exp": now + 600, "iss": "ai-secretary"}).encode())
    p.expect("tampered payload", "GET", "/assistants", {401}, token=f"{head}.{forged}.{sig}")
    p.expect("expired", "GET", "/assistants", {401},
             token=jwt({"sub": alice_id, "iat": now - 7200, "exp": now - 3600, "iss": "ai-secretary"}))
    p.expect("valid signature, no such account", "GET", "/assistants", {401},
             token=jwt({"sub": str(uuid.uuid4()), "iat": now, "exp": now + 600, "iss": "ai-secretary"}))

    # Another user's resources: the same 404 as an unknown id
    for name, method, path, body in [
        ("read", "GET", f"/assistants/{assistant}", None),
        ("patch", "PATCH", f"/assistants/{assistant}", {"name": "Mine"}),
        ("archive", "POST", f"/assistants/{assistant}/archive", {}),
        ("delete", "DELETE", f"/assistants/{assistant}", None),
        ("conversation", "GET", f"/conversations/{conversation}", None),
        ("messages", "GET", f"/conversations/{conversation}/messages", None),
        ("post", "POST", f"/conversations/{conversation}/messages", {"content": "hi"}),
        ("stream", "GET", f"/conversations/{conversation}/stream", None),
        ("start with it", "POST", "/conversations", {"assistant_id": assistant}),
    ]:
        p.expect(f"another user's {name} is 404", method, path, {404}, appends_nothing=True,
                 body=body, token=bob)

    # NUL and control characters in every string field
    nul = "a\u0000b"
    for name, path, body, token in [
        ("register email", "/users", {"email": f"x{nul}@example.com", "password": "correct horse battery", "display_name": "X"}, None),
        ("register name", "/users", {"email": f"n-{run}@example.com", "password": "correct horse battery", "display_name": nul}, None),
        ("register password", "/users", {"email": f"p-{run}@example.com", "password": f"correct horse{nul}", "display_name": "X"}, None),
        ("login email", "/auth/token", {"email": nul, "password": "x"}, None),
        ("assistant name", "/assistants", {"name": nul}, alice),
        ("assistant instructions", "/assistants", {"name": "A", "instructions": nul}, alice),
        ("assistant metadata", "/assistants", {"name": "A", "metadata": {"k": nul}}, alice),
        ("assistant metadata key", "/assistants", {"name": "A", "metadata": {nul: "v"}}, alice),
        ("conversation title", "/conversations", {"assistant_id": assistant, "title": nul}, alice),
        ("message", f"/conversations/{conversation}/messages", {"content": nul}, alice),
        ("bell in a name", "/assistants", {"name": "a\u0007b"}, alice),
        ("escape in a title", "/conversations", {"assistant_id": assistant, "title": "a\u001bb"}, alice),
    ]:
        p.expect(f"control character: {name} is 4xx", "POST", path, {400, 422}, appends_nothing=True,
                 body=body, token=token)

    # Absurd dates and parameters
    for query in ["to=-262143-01-15", "from=+275760-09-13", "from=9999-12-31&to=0001-01-01",
                  "from=2026-02-30", "group_by=everything", "from=1969-12-31"]:
        p.expect(f"stats {query}", "GET", f"/stats/usage?{query}", {200, 400, 422}, token=alice)
    for query in ["limit=0", "limit=101", "limit=-1", "limit=1e9", "after=not-an-id", "order=sideways"]:
        p.expect(f"list {query} is 4xx", "GET", f"/assistants?{query}", {400, 422}, token=alice)
    p.expect("id that is not a uuid", "GET", "/assistants/..%2f..%2fetc", {400, 404}, token=alice)
    p.expect("user id as an assistant id", "GET", f"/assistants/{alice_id}", {404}, token=alice)
    p.expect("consistency token garbage", "GET", "/assistants", {400}, token=alice,
             headers={"x-consistency-token": "9999999999999.1"})
    p.expect("If-Match garbage", "PATCH", f"/assistants/{assistant}", {400, 412}, appends_nothing=True,
             body={"name": "B"}, token=alice, headers={"if-match": "W/\"x\""})
    p.expect("Idempotency-Key of 300 characters", "POST", "/assistants", {400, 422}, appends_nothing=True,
             body={"name": "B"}, token=alice, headers={"idempotency-key": "k" * 300})

    # Bodies
    p.expect("2 MiB body is 413", "POST", "/assistants", {413}, appends_nothing=True, token=alice,
             raw=b'{"name":"' + b"a" * (2 << 20) + b'"}', headers={"content-type": "application/json"})
    p.expect("wrong content type is 415", "POST", "/assistants", {415}, appends_nothing=True, token=alice,
             raw=b"name=a", headers={"content-type": "application/x-www-form-urlencoded"})
    p.expect("malformed JSON is 400", "POST", "/assistants", {400}, appends_nothing=True, token=alice,
             raw=b'{"name":', headers={"content-type": "application/json"})
    p.expect("guessable password is 422", "POST", "/users", {422}, appends_nothing=True,
             body={"email": f"weak-{run}@example.com", "password": "password", "display_name": "W"})

    # Headers on personal data
    _, _, headers = request("POST", p.base + "/auth/token",
                            {"email": f"alice-{run}@example.com", "password": "correct horse battery"})
    p.check("token response is no-store", "no-store" in headers.get("cache-control", headers.get("Cache-Control", "")))
    _, _, headers = request("GET", p.base + "/users/me", token=alice)
    p.check("profile is no-store", "no-store" in headers.get("cache-control", headers.get("Cache-Control", "")))

    # Personal data in the event log: sealed
    dump = psql(p.database, "SELECT data::text FROM events")
    p.check("no email or hash in plaintext in the events", f"alice-{run}" not in dump and "argon2" not in dump)
    reservations = psql(p.database, "SELECT value FROM reservations")
    p.check("reservations hold no email", "@" not in reservations)

    # Floods
    lockout = f"lock-{run}@example.com"
    p.user(lockout)
    for _ in range(5):
        request("POST", p.base + "/auth/token", {"email": lockout, "password": "wrong wrong wrong"})
    status, _, headers = p.expect("right password after 5 failures is 429", "POST", "/auth/token", {429},
                                  body={"email": lockout, "password": "correct horse battery"})
    p.check("lockout has Retry-After", "retry-after" in {k.lower() for k in headers})
    statuses = [request("POST", p.base + "/assistants", {"name": f"n{i}"}, bob)[0] for i in range(450)]
    p.check("command flood is 429 past the bucket", 429 in statuses and max(statuses) < 500,
            f"{sorted(set(statuses))}")
    statuses = [request("POST", p.base + "/auth/token", {"email": f"nobody{i}@example.com", "password": "x" * 12})[0]
                for i in range(40)]
    p.check("login flood from one address is 429", 429 in statuses and max(statuses) < 500, f"{sorted(set(statuses))}")
    statuses = [request("POST", p.base + "/users", {"email": f"flood{i}-{run}@example.com",
                                                    "password": "correct horse battery", "display_name": "F"})[0]
                for i in range(70)]
    p.check("sign-up flood from one address is 429", 429 in statuses and max(statuses) < 500,
            f"{sorted(set(statuses))}")

    # Forget me
    old = jwt({"sub": alice_id, "iat": now - 900, "exp": now + 3600, "iss": "ai-secretary"})
    p.expect("forget with an old token and no password is 401", "DELETE", "/users/me", {401},
             appends_nothing=True, token=old)
    p.expect("forget with a wrong password is 401", "DELETE", "/users/me", {401}, appends_nothing=True,
             token=old, body={"password": "wrong horse battery"})
    p.expect("forget with the password is 204", "DELETE", "/users/me", {204}, token=old,
             body={"password": "correct horse battery"})
    time.sleep(2)
    p.expect("the forgotten user's token is 401", "GET", "/users/me", {401}, token=alice)
    p.expect("the forgotten user's commands are 401", "POST", "/assistants", {401}, appends_nothing=True,
             body={"name": "again"}, token=alice)
    whole = subprocess.run(["pg_dump", "--data-only", "--dbname", f"{PG}/{p.database}"],
                           check=True, capture_output=True, text=True).stdout
    p.check("nothing of the forgotten user in pg_dump", f"alice-{run}" not in whole and "Alice" not in whole)
    p.check("the other user's read models are still there (the grep finds what is there)",
            "\tn0\t" in whole)


if __name__ == "__main__":
    main()
