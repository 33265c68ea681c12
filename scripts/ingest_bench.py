#!/usr/bin/env python3
"""Ingest throughput over HTTP, and retrieval latency while it runs.

Posts a JSONL corpus to a running server's collections API in batches (one commit each),
while a second thread searches the same collection (`GET /v1/collections/NAME/search`) and
records the search time each reports; then the same searches with no ingest running. Loopback only; bounded in requests and time. Standard library only.

  python3 scripts/ingest_bench.py --base http://127.0.0.1:8080 --key ADMIN_KEY \\
      --corpus index/samples/pubmedqa/corpus.jsonl --collection bench-ingest --batch 50
"""
import argparse
import json
import statistics
import threading
import time
import urllib.error
import urllib.parse
import urllib.request


def call(base, method, path, key, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + key)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="http://127.0.0.1:8080")
    ap.add_argument("--key", required=True, help="the server's admin key")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--collection", default="bench-ingest")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5,
                    help="times the corpus is sent (ids repeat, so later rounds replace)")
    ap.add_argument("--question", default="Does the treatment improve survival?")
    args = ap.parse_args()
    if not args.base.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("ingest_bench.py: loopback servers only")

    lines = [l for l in open(args.corpus, encoding="utf-8").read().splitlines() if l.strip()]
    call(args.base, "DELETE", f"/v1/collections/{args.collection}", args.key)
    # A first small batch so searches have a collection to read from the start.
    first, rest = lines[:10], lines[10:] + lines * (args.rounds - 1)
    st, v = call(args.base, "POST", f"/v1/collections/{args.collection}/documents", args.key,
                 raw="\n".join(first).encode())
    assert st in (200, 201), (st, v)

    q = urllib.parse.quote(args.question)

    def search_times(stop, out, limit=2000):
        while not stop.is_set() and len(out) < limit:
            st, v = call(args.base, "GET", f"/v1/collections/{args.collection}/search?q={q}&k=3",
                         args.key)
            if st == 200:
                out.append(v["search_ms"])

    during, stop = [], threading.Event()
    t = threading.Thread(target=search_times, args=(stop, during))
    t.start()
    t0, docs, passages = time.monotonic(), 0, 0
    for i in range(0, len(rest), args.batch):
        chunk = rest[i: i + args.batch]
        st, v = call(args.base, "POST", f"/v1/collections/{args.collection}/documents",
                     args.key, raw="\n".join(chunk).encode())
        assert st in (200, 201), (st, v)
        docs += v["documents"]
        passages += v["passages"]
    wall = time.monotonic() - t0
    stop.set()
    t.join()
    after, stop2 = [], threading.Event()
    timer = threading.Timer(10.0, stop2.set)
    timer.start()
    search_times(stop2, after, limit=len(during) or 20)
    timer.cancel()
    call(args.base, "DELETE", f"/v1/collections/{args.collection}", args.key)

    print(f"ingest     {docs} documents ({passages} passages; {args.rounds} rounds of "
          f"{len(lines)}) in {wall:.2f} s, batches of {args.batch}: {docs / wall:.0f} "
          f"documents/s, {passages / wall:.0f} passages/s")
    for name, xs in (("during", during), ("after", after)):
        if xs:
            print(f"retrieve   {name:6} ingest: {len(xs)} requests, p50 {statistics.median(xs):.2f} ms, "
                  f"p99 {pct(xs, 0.99):.2f} ms, max {max(xs):.2f} ms")


if __name__ == "__main__":
    main()
