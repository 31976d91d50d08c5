#!/usr/bin/env python3
"""Failover drill: the standby topology under load, with database connections cut.

Starts, on a fresh database, stream and key prefix of its own:
`ai-secretary serve`, `reply`, two `relay` and two `project` processes (each
pair an active and a standby). WRITERS users each post messages into a
conversation of their own for SECONDS seconds while every backend of the
database is terminated (`pg_terminate_backend`) at each of the CUT times. Then
it waits for the read side to catch up and checks:

- no response had a status of 500 or more;
- every acknowledged message and its reply are in the `messages` read model,
  the reply answered;
- each conversation counts exactly its acknowledged messages and replies;
- `ai-secretary verify` exits 0;
- every lease changed hands at least once per cut.

Usage: scripts/failover_drill.py [--writers 8] [--seconds 40] [--cuts 13,26]
Needs: a release build (cargo build --release), psql, and the servers of the
README (Postgres, NATS, Redis) on their default ports. Exit status 0 when every
check holds. Benchmarks and load tests run with RATE_LIMIT_COMMANDS_PER_MINUTE=0.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "ai-secretary")
PG = "postgres://postgres@127.0.0.1:5432"


def request(method, url, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return 599, str(e)  # no answer at all counts as a server error


def psql(database, sql):
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-q", f"{PG}/{database}", "-c", sql],
        check=True, capture_output=True, text=True)
    return out.stdout.strip()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=40)
    parser.add_argument("--cuts", default="13,26", help="seconds from the start, comma-separated")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()
    cuts = [int(c) for c in args.cuts.split(",") if c]

    run = uuid.uuid4().hex[:12]
    database = f"ai_secretary_drill_{run}"
    env = dict(os.environ,
               DATABASE_URL=f"{PG}/{database}",
               NATS_STREAM=f"DRILL_{run}",
               NATS_SUBJECT_PREFIX=f"drill_{run}.events",
               REDIS_KEY_PREFIX=f"drill_{run}",
               RATE_LIMIT_COMMANDS_PER_MINUTE="0",
               RATE_LIMIT_SIGNUPS_PER_HOUR="0",
               RATE_LIMIT_LOGINS_PER_MINUTE="0",
               LOG_FORMAT="json",
               RUST_LOG="info,sqlx=warn,tower_http=warn")
    logs = os.path.join(ROOT, "target", f"drill-{run}")
    os.makedirs(logs)
    processes = []

    def start(name, *command):
        port = free_port()
        log = open(os.path.join(logs, f"{name}.log"), "w")
        child = subprocess.Popen([BINARY, *command], env=dict(env, BIND=f"127.0.0.1:{port}"),
                                 stdout=log, stderr=subprocess.STDOUT)
        processes.append((name, child))
        return port

    try:
        subprocess.run([BINARY, "migrate"], env=env, check=True, capture_output=True)
        api = start("serve", "serve")
        start("reply", "reply")
        for role in ("relay", "project"):
            start(f"{role}-1", role)
            start(f"{role}-2", role)
        base = f"http://127.0.0.1:{api}/api/v1"
        for _ in range(100):
            if request("GET", f"http://127.0.0.1:{api}/health")[0] == 200:
                break
            time.sleep(0.1)

        writers = []
        for i in range(args.writers):
            email = f"drill{i}-{run}@example.com"
            status, _ = request("POST", f"{base}/users",
                                {"email": email, "password": "correct horse battery",
                                 "display_name": f"Writer {i}"})
            assert status == 201, status
            _, token = request("POST", f"{base}/auth/token",
                               {"email": email, "password": "correct horse battery"})
            token = token["access_token"]
            _, assistant = request("POST", f"{base}/assistants", {"name": f"Aide {i}"}, token)
            _, conversation = request("POST", f"{base}/conversations",
                                      {"assistant_id": assistant["id"]}, token)
            writers.append((token, conversation["id"]))

        statuses = Counter()
        acknowledged = []  # (conversation, message id, reply id)
        lock = threading.Lock()
        deadline = time.monotonic() + args.seconds

        def write(token, conversation, w):
            i = 0
            while time.monotonic() < deadline:
                i += 1
                status, body = request("POST", f"{base}/conversations/{conversation}/messages",
                                       {"content": f"writer {w} message {i}"}, token)
                with lock:
                    statuses[status] += 1
                    if 200 <= status < 300:
                        acknowledged.append((conversation, body["message"]["id"], body["reply"]["id"]))
                    elif status >= 500:
                        print(f"  {status}: {body}", file=sys.stderr)

        threads = [threading.Thread(target=write, args=(t, c, w)) for w, (t, c) in enumerate(writers)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for at in cuts:
            time.sleep(max(0, started + at - time.monotonic()))
            cut = psql("postgres", "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   f"WHERE datname = '{database}' AND pid <> pg_backend_pid()")
            print(f"cut {cut} connections at {time.monotonic() - started:.1f} s")
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        total = sum(statuses.values())
        print(f"{total} requests in {elapsed:.1f} s ({total / elapsed:.0f}/s), statuses {dict(statuses)}")

        # The read side catches up: every acknowledged message and reply listed, ended.
        ids = [i for _, m, r in acknowledged for i in (m, r)]
        caught = None
        for _ in range(600):
            listed = psql(database, "SELECT count(*) FILTER (WHERE status NOT IN ('queued', 'in_progress')) "
                                    "|| ' ' || count(*) FROM messages")
            ended, present = (int(x) for x in listed.split())
            behind = psql(database, "SELECT count(*) FROM checkpoints c WHERE (c.transaction_id, c.global_position) < "
                                    "(SELECT transaction_id::text::int8, global_position FROM events "
                                    "ORDER BY transaction_id DESC, global_position DESC LIMIT 1)")
            if present >= len(ids) and ended >= len(ids) and behind == "0":
                caught = time.monotonic()
                break
            time.sleep(0.5)
        failures = []
        if caught is None:
            failures.append("the read side did not catch up within 5 minutes")
        server_errors = sum(n for s, n in statuses.items() if s >= 500)
        if server_errors:
            failures.append(f"{server_errors} responses with a status of 500 or more")
        # Every acknowledged id is listed (checked in chunks against the read model).
        missing = 0
        for k in range(0, len(ids), 500):
            chunk = ",".join(f"'{i}'" for i in ids[k:k + 500])
            found = int(psql(database, f"SELECT count(*) FROM messages WHERE id IN ({chunk})"))
            missing += len(ids[k:k + 500]) - found
        if missing:
            failures.append(f"{missing} acknowledged messages or replies missing from `messages`")
        posted = Counter(c for c, _, _ in acknowledged)
        wrong = 0
        for conversation, n in posted.items():
            count = int(psql(database, f"SELECT message_count FROM conversations WHERE id = '{conversation}'"))
            wrong += count != 2 * n
        if wrong:
            failures.append(f"{wrong} conversations with the wrong message_count")
        verify = subprocess.run([BINARY, "verify"], env=env, capture_output=True, text=True)
        print(verify.stdout.strip().splitlines()[-1] if verify.stdout else verify.stderr)
        if verify.returncode != 0:
            failures.append(f"ai-secretary verify exited {verify.returncode}")
        epochs = psql(database, "SELECT string_agg(name || '=' || epoch, ' ' ORDER BY name) FROM checkpoints")
        print(f"lease epochs: {epochs}")
        for pair in epochs.split():
            name, epoch = pair.split("=")
            if int(epoch) < 1 + len(cuts):
                failures.append(f"{name} changed hands only {int(epoch) - 1} times for {len(cuts)} cuts")
        events = psql(database, "SELECT count(*) FROM events")
        print(f"{len(acknowledged)} messages acknowledged, {events} events in the store, "
              f"every one of {len(ids)} messages and replies listed: {missing == 0}")
        for failure in failures:
            print(f"FAILED: {failure}")
        print("drill passed" if not failures else "drill FAILED", f"(logs in {logs})")
        return 1 if failures else 0
    finally:
        for _, child in processes:
            child.send_signal(signal.SIGTERM)
        for _, child in processes:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        if not args.keep:
            subprocess.run(["psql", "-X", "-q", f"{PG}/postgres", "-c",
                            f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'], capture_output=True)
            drop_stream(env["NATS_STREAM"])
            subprocess.run(["sh", "-c", f"redis-cli --scan --pattern '{env['REDIS_KEY_PREFIX']}:*' "
                                        "| xargs -r redis-cli del"], capture_output=True)


def drop_stream(name):
    """Delete the drill's JetStream stream (a JetStream API request over plain NATS)."""
    import socket
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=5) as s:
            s.recv(4096)  # INFO
            s.sendall(f"CONNECT {{}}\r\nPUB $JS.API.STREAM.DELETE.{name} 0\r\n\r\nPING\r\n".encode())
            s.recv(4096)  # PONG: the request was processed
    except OSError as e:
        print(f"could not delete stream {name}: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
