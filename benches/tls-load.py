#!/usr/bin/env python3
"""tls-load.py - sessions per second with and without STARTTLS, same generator, same run.

    tls-load.py --port PORT [-n SESSIONS] [--procs P] [--threads T] [--tls]

Each session: EHLO, (STARTTLS, EHLO), MAIL, RCPT, DATA with a 1 KiB message, QUIT.
The certificate is not verified (the point is the server's cost, not the PKI).
Prints one JSON line: sessions, seconds, sessions_per_s, errors.
"""
import argparse
import json
import multiprocessing
import smtplib
import ssl
import threading
import time

BODY = "Subject: tls load\r\n\r\n" + ("x" * 76 + "\r\n") * 12


def session(port, use_tls, ctx):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("load.example.org")
        if use_tls:
            s.starttls(context=ctx)
            s.ehlo("load.example.org")
        s.sendmail("load@example.org", ["rcpt@bench.test"], BODY)


def worker(args):
    port, use_tls, count, threads = args
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    errors = [0]
    per = count // threads

    def run():
        for _ in range(per):
            try:
                session(port, use_tls, ctx)
            except Exception:
                errors[0] += 1

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return per * threads, errors[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--tls", action="store_true")
    a = ap.parse_args()
    per_proc = a.n // a.procs
    start = time.monotonic()
    with multiprocessing.Pool(a.procs) as pool:
        results = pool.map(worker, [(a.port, a.tls, per_proc, a.threads)] * a.procs)
    took = time.monotonic() - start
    done = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    print(json.dumps({"tls": a.tls, "sessions": done, "seconds": round(took, 3),
                      "sessions_per_s": round((done - errors) / took, 1), "errors": errors}))


if __name__ == "__main__":
    main()
