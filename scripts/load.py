#!/usr/bin/env python3
"""Bounded loopback load test for a running ttarag server (Python 3 standard library only).

It starts nothing: run the server yourself (`make run`, or `ttarag serve`), then
`make load` or `python3 scripts/load.py --base http://127.0.0.1:8080`. It only talks to
loopback addresses and stops by itself: a fixed number of requests, a per-request timeout and a
total time cap.

What it measures:

1. reference: each question once, alone, in mode static with max_tokens 1, to learn the passage
   ids BM25 retrieves for it (`rag.passages[].id`). BM25 is deterministic, so these are the
   ids every later answer to that question must carry.
2. load: for each concurrency (--concurrency) and each mode (--modes), --requests chat
   requests (temperature 0, fixed seed). Per (mode, concurrency): req/s (200 responses per
   second of wall time), p50/p99 latency of the 200s, counts of 200, 429 (and how many carried
   Retry-After), other statuses, LOST responses (no complete response: transport error,
   truncated body, unreadable JSON, timeout) and MIXED-UP responses (a 200 whose passage ids
   are not its own question's reference ids; adaptation in mode tta does not change
   retrieval, so they are compared there too).
3. hang-up storm: --storm clients at once send a streamed tta request with a long max_tokens
   and close the socket as soon as the first bytes arrive; then one static request is timed
   and shown next to the single-client static p50 of the load phase (near it = the workers
   were freed). Deltas of `ttarag_requests_total{status="cancelled"}` and
   `ttarag_jobs_cancelled_total` from /metrics, and /health's in_flight once it settles to 0.

Exit status: 0 when no response was lost or mixed up, 1 otherwise (also when a reference could
not be taken, or the time cap cut the run short, because then not everything was checked),
2 for bad arguments (a non-loopback --base, for one).

HTTP/1.1 is spoken by hand over asyncio streams (one `Connection: close` request per socket),
which gives exact control over when a client hangs up.
"""

import argparse
import asyncio
import ipaddress
import json
import os
import sys
import time
from urllib.parse import urlsplit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_QUESTIONS = os.path.join(REPO, "data", "qasc", "questions.jsonl")


# ---------------------------------------------------------------- arguments and target


class Target:
    """Where the server is: host, port and the Host header value."""

    def __init__(self, host, port, api_key=None):
        self.host = host
        self.port = port
        self.api_key = api_key
        self.host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def loopback_target(base, api_key):
    """Parses --base, refusing anything that is not plain http on a loopback address:
    this tool generates load, and it must not be pointed at someone else's server."""
    u = urlsplit(base)
    host = u.hostname or ""
    if u.scheme != "http":
        raise ValueError(f"--base must be an http:// URL, got {base!r}")
    if host != "localhost":
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"--base host {host!r} is not a loopback address "
                             "(127.0.0.0/8, ::1 or localhost)")
        if not addr.is_loopback:
            raise ValueError(f"--base host {host!r} is not a loopback address "
                             "(127.0.0.0/8, ::1 or localhost)")
    if u.path not in ("", "/"):
        raise ValueError(f"--base must have no path (the tool adds /v1/...), got {u.path!r}")
    return Target(host, u.port or 80, api_key)


def int_list(text):
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers separated by commas")
    return values


def mode_list(text):
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("static", "tta", "none", "auto")]
    if not modes or bad:
        raise argparse.ArgumentTypeError("modes are static, tta, none, auto")
    return modes


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="scripts/load.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="`make load` runs this script with its defaults against the server that "
               "`make run` started (it starts no server itself); pass other flags with "
               "`make load ARGS='--requests 6 --concurrency 1,2'`.",
    )
    p.add_argument("--base", default="http://127.0.0.1:8080",
                   help="server base URL, loopback only (default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("TTARAG_API_KEY"),
                   help="Bearer key for a server with [auth] api_keys (default: $TTARAG_API_KEY)")
    p.add_argument("--concurrency", type=int_list, default=[1, 4, 8],
                   help="client concurrencies of the load phase (default 1,4,8)")
    p.add_argument("--modes", type=mode_list, default=["static", "tta"],
                   help="rag modes of the load phase (default static,tta)")
    p.add_argument("--requests", type=int, default=24,
                   help="requests per (mode, concurrency) (default %(default)s)")
    p.add_argument("--questions", default=DEFAULT_QUESTIONS,
                   help="JSONL file, one object with a `question` field per line; the first "
                        "--requests are used, cycled if fewer (default data/qasc/questions.jsonl)")
    p.add_argument("--collection", default=None,
                   help="rag.collection to send (default: the server's)")
    p.add_argument("--max-tokens", type=int, default=24,
                   help="max_tokens of load-phase requests (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every request (default 0)")
    p.add_argument("--storm", type=int, default=16,
                   help="clients of the hang-up storm; 0 skips it (default %(default)s)")
    p.add_argument("--storm-max-tokens", type=int, default=200,
                   help="max_tokens of the storm's streamed tta requests (default %(default)s)")
    p.add_argument("--timeout", type=float, default=150.0,
                   help="seconds one request may take before it counts as lost; keep it above "
                        "the server's request_timeout_ms so its 504s are seen (default %(default)s)")
    p.add_argument("--time-cap", type=float, default=900.0,
                   help="seconds the whole run may take; past it the run stops and exits 1 "
                        "(default %(default)s)")
    p.add_argument("--settle", type=float, default=60.0,
                   help="seconds to wait after the storm for /health in_flight to reach 0 "
                        "(default %(default)s)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the one uncounted request per mode before the load phase (the "
                        "first tta request also makes one-off weight copies)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write every figure to FILE as JSON")
    a = p.parse_args(argv)
    if a.requests < 1 or a.max_tokens < 1 or a.storm < 0 or a.timeout <= 0 or a.time_cap <= 0:
        p.error("--requests and --max-tokens must be >= 1, --storm >= 0, timeouts > 0")
    try:
        a.target = loopback_target(a.base, a.api_key)
    except ValueError as e:
        print(f"load.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    return a


def load_questions(path, n):
    """The first n questions of a JSONL file (cycled when the file has fewer)."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                questions.append(json.loads(line)["question"])
            if len(questions) == n:
                break
    if not questions:
        raise ValueError(f"{path} has no questions")
    return [questions[i % len(questions)] for i in range(n)]


# ---------------------------------------------------------------- time bounds


class Clock:
    """The run's total time cap: every wait is the smaller of its own bound and what is left."""

    def __init__(self, cap):
        self.end = time.monotonic() + cap
        self.hit = False

    def left(self):
        return self.end - time.monotonic()

    def bound(self, seconds):
        return max(0.0, min(seconds, self.left()))

    def timed_out(self):
        """Names a timeout: the request's own, or the cap's (which marks the run cut short)."""
        if self.left() <= 0.05:
            self.hit = True
            return "time cap"
        return "timeout"


# ---------------------------------------------------------------- minimal HTTP/1.1 client


class Lost(Exception):
    """No complete response: the reason is what the table reports."""


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # lower-case name -> value
        self.body = body

    def json(self):
        return json.loads(self.body.decode("utf-8"))


def request_bytes(target, method, path, body=None):
    head = [f"{method} {path} HTTP/1.1", f"Host: {target.host_header}",
            "Connection: close", "Accept: */*"]
    if target.api_key:
        head.append(f"Authorization: Bearer {target.api_key}")
    data = b""
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + data


async def read_head(reader):
    """Status line and headers. An empty read here means the server closed without answering."""
    line = await reader.readline()
    if not line:
        raise Lost("closed before the status line")
    parts = line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise Lost("bad status line")
    headers = {}
    while True:
        line = await reader.readline()
        if not line:
            raise Lost("closed inside the headers")
        if line in (b"\r\n", b"\n"):
            return int(parts[1]), headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


async def read_chunked(reader):
    """A chunked body (hyper streams SSE this way); a missing final chunk is a truncation."""
    body = bytearray()
    while True:
        size_line = await reader.readline()
        if not size_line.endswith(b"\n"):
            raise Lost("truncated chunked body")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # the chunk's CRLF


async def read_body(reader, headers):
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await read_chunked(reader)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()  # delimited by EOF (we asked for Connection: close)


async def exchange(target, method, path, body=None):
    """One request on a fresh connection; raises Lost when no complete response comes."""
    writer = None
    try:
        reader, writer = await asyncio.open_connection(target.host, target.port,
                                                       limit=1 << 20)
        writer.write(request_bytes(target, method, path, body))
        await writer.drain()
        status, headers = await read_head(reader)
        return Response(status, headers, await read_body(reader, headers))
    except asyncio.IncompleteReadError:
        raise Lost("truncated body")
    except (OSError, ValueError, asyncio.LimitOverrunError) as e:
        raise Lost(type(e).__name__)
    finally:
        if writer is not None:
            writer.close()


async def fetch(target, method, path, body, timeout):
    """exchange() under a timeout; a timeout is a lost response too."""
    try:
        return await asyncio.wait_for(exchange(target, method, path, body), timeout)
    except asyncio.TimeoutError:
        raise Lost("timeout")


# ---------------------------------------------------------------- requests and results


def chat_body(args, question, mode, max_tokens, stream=False):
    rag = {"mode": mode}
    if args.collection:
        rag["collection"] = args.collection
    body = {"messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "seed": args.seed, "rag": rag}
    if stream:
        body["stream"] = True
    return body


class Outcome:
    """What one chat request ended as."""

    def __init__(self, latency, status=None, lost=None, retry_after=False,
                 passage_ids=None, text=None, mode=None):
        self.latency = latency
        self.status = status            # HTTP status; None when lost
        self.lost = lost                # why, when no complete response came
        self.retry_after = retry_after  # a 429 carried Retry-After
        self.passage_ids = passage_ids  # a 200's rag.passages[].id
        self.text = text
        self.mode = mode                # rag.mode the server reports


async def chat(args, clock, body):
    start = time.monotonic()
    try:
        r = await fetch(args.target, "POST", "/v1/chat/completions", body,
                        clock.bound(args.timeout))
    except Lost as e:
        reason = clock.timed_out() if str(e) == "timeout" else str(e)
        return Outcome(time.monotonic() - start, lost=reason)
    latency = time.monotonic() - start
    if r.status != 200:
        return Outcome(latency, status=r.status, retry_after="retry-after" in r.headers)
    try:
        doc = r.json()
        rag = doc.get("rag") or {}
        ids = [p["id"] for p in rag.get("passages") or []]
        text = doc["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        # A 200 without a readable completion is no response at all for the client.
        return Outcome(latency, lost="unreadable 200 body")
    return Outcome(latency, status=200, passage_ids=ids, text=text, mode=rag.get("mode"))


def percentile(values, q):
    """Nearest-rank percentile (no interpolation: with 24 samples p99 is the maximum)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 1)


# ---------------------------------------------------------------- phase 1: reference ids


async def take_references(args, clock, questions):
    """Each distinct question once, one at a time: the passage ids it must always get."""
    refs, failures = {}, {}
    for q in dict.fromkeys(questions):
        if clock.left() <= 0:
            clock.hit = True
            break
        o = await chat(args, clock, chat_body(args, q, "static", 1))
        if o.status == 200 and o.passage_ids:
            refs[q] = o.passage_ids
        elif o.status == 200:
            failures[q] = "no passages retrieved (nothing to check against)"
        else:
            failures[q] = o.lost or f"status {o.status}"
    return refs, failures


async def warm_up(args, clock, questions):
    """One uncounted request per mode, so one-off costs (the first adaptation copies weights)
    do not land in the first row's p99."""
    for mode in args.modes:
        await chat(args, clock, chat_body(args, questions[0], mode, args.max_tokens))


# ---------------------------------------------------------------- phase 2: load


async def run_batch(args, clock, questions, mode, concurrency):
    """--requests requests, at most `concurrency` at a time; returns (outcomes, wall, skipped)."""
    todo = list(enumerate(questions))
    outcomes = [None] * len(todo)

    async def client():
        while todo and clock.left() > 0:
            i, q = todo.pop(0)
            outcomes[i] = (q, await chat(args, clock, chat_body(args, q, mode, args.max_tokens)))

    start = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.monotonic() - start
    if todo:
        clock.hit = True
    return [o for o in outcomes if o is not None], wall, len(todo)


def summarise_batch(mode, concurrency, outcomes, wall, skipped, refs):
    ok = [o for _, o in outcomes if o.status == 200]
    too_many = [o for _, o in outcomes if o.status == 429]
    others, lost = {}, {}
    for _, o in outcomes:
        if o.lost:
            lost[o.lost] = lost.get(o.lost, 0) + 1
        elif o.status not in (200, 429):
            others[str(o.status)] = others.get(str(o.status), 0) + 1
    # A 200 carrying passages other than its own question's is an answer to someone else.
    mixed = sum(1 for q, o in outcomes
                if o.status == 200 and q in refs and o.passage_ids != refs[q])
    unchecked = sum(1 for q, o in outcomes if o.status == 200 and q not in refs)
    wrong_mode = sum(1 for o in ok if o.mode != mode)
    latencies = [o.latency for o in ok]
    return {
        "mode": mode, "concurrency": concurrency, "sent": len(outcomes), "skipped": skipped,
        "ok": len(ok), "r429": len(too_many),
        "r429_retry_after": sum(1 for o in too_many if o.retry_after),
        "other": others, "lost": sum(lost.values()), "lost_reasons": lost,
        "mixed_up": mixed, "unchecked": unchecked, "wrong_mode": wrong_mode,
        "wall_s": round(wall, 3), "req_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "p50_ms": ms(percentile(latencies, 50)), "p99_ms": ms(percentile(latencies, 99)),
    }


def text_variants(all_outcomes):
    """Informational: (mode, question) pairs whose greedy answer differed between requests.
    Same seed, temperature 0: a difference means concurrency changed the numbers."""
    seen = {}
    for mode, q, o in all_outcomes:
        if o.status == 200:
            seen.setdefault((mode, q), set()).add(o.text)
    return sum(1 for texts in seen.values() if len(texts) > 1)


async def load_phase(args, clock, questions, refs):
    rows, everything = [], []
    for concurrency in args.concurrency:
        for mode in args.modes:
            if clock.left() <= 0:
                clock.hit = True
                return rows, everything
            outcomes, wall, skipped = await run_batch(args, clock, questions, mode, concurrency)
            rows.append(summarise_batch(mode, concurrency, outcomes, wall, skipped, refs))
            everything += [(mode, q, o) for q, o in outcomes]
    return rows, everything


# ---------------------------------------------------------------- phase 3: hang-up storm


async def hang_up_after_first_bytes(args, clock, question):
    """Sends a streamed tta request and closes the socket as soon as anything of the body (or,
    failing that, the headers) arrives: a client that went away mid-answer."""
    start = time.monotonic()
    writer = None
    body = chat_body(args, question, "tta", args.storm_max_tokens, stream=True)
    try:
        async def first_bytes():
            nonlocal writer
            reader, writer = await asyncio.open_connection(args.target.host, args.target.port)
            writer.write(request_bytes(args.target, "POST", "/v1/chat/completions", body))
            await writer.drain()
            status, headers = await read_head(reader)
            if status == 200:
                await reader.read(1)  # the first body bytes (the role chunk), or EOF
            return status, "retry-after" in headers

        status, retry_after = await asyncio.wait_for(first_bytes(), clock.bound(args.timeout))
        return {"status": status, "retry_after": retry_after, "ttfb": time.monotonic() - start}
    except (Lost, OSError, ValueError, asyncio.TimeoutError) as e:
        return {"status": None, "lost": str(e) or type(e).__name__,
                "ttfb": time.monotonic() - start}
    finally:
        if writer is not None:
            writer.close()  # the hang-up itself


def metric_sums(text):
    """The two cancellation counters from a Prometheus text page (None when absent)."""
    cancelled = jobs = None
    for line in text.splitlines():
        if line.startswith("ttarag_requests_total{") and 'status="cancelled"' in line:
            cancelled = (cancelled or 0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("ttarag_jobs_cancelled_total"):
            jobs = (jobs or 0) + float(line.rsplit(" ", 1)[1])
    return cancelled, jobs


async def read_metrics(args, clock):
    try:
        r = await fetch(args.target, "GET", "/metrics", None, clock.bound(10.0))
        if r.status == 200:
            return metric_sums(r.body.decode("utf-8", "replace"))
    except Lost:
        pass
    return None, None


async def read_health(args, clock):
    try:
        r = await fetch(args.target, "GET", "/health", None, clock.bound(10.0))
        return r.json()
    except (Lost, ValueError):
        return None


async def wait_idle(args, clock):
    """Polls /health until in_flight and queue_depth are 0 (bounded by --settle)."""
    start = time.monotonic()
    health = None
    while time.monotonic() - start < args.settle and clock.left() > 0:
        health = await read_health(args, clock)
        if health is not None and "in_flight" not in health:
            break  # a server that does not report it: nothing to wait for
        if health and health.get("in_flight") == 0 and health.get("queue_depth", 0) == 0:
            break
        await asyncio.sleep(0.2)
    return health, time.monotonic() - start


def delta(before, after):
    """after - before; a labelled series appears at its first count, so absent before is 0,
    and absent after (no cancelled request ever counted, or no such metric) is n/a."""
    if after is None:
        return None
    return int(after - (before or 0))


async def storm_phase(args, clock, questions, single_p50_ms):
    before = await read_metrics(args, clock)
    clients = await asyncio.gather(*(hang_up_after_first_bytes(args, clock,
                                                               questions[i % len(questions)])
                                     for i in range(args.storm)))
    # The request that shows whether the hung-up jobs still hold the workers.
    probe = await chat(args, clock, chat_body(args, questions[0], "static", args.max_tokens))
    health, settle_s = await wait_idle(args, clock)
    after = await read_metrics(args, clock)
    statuses = {}
    for c in clients:
        key = str(c["status"]) if c["status"] is not None else "lost"
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "clients": args.storm, "first_bytes_statuses": statuses,
        # A storm client that got not even the headers was refused nothing: it was lost.
        "lost": sum(1 for c in clients if c["status"] is None),
        "lost_reasons": sorted({c["lost"] for c in clients if c["status"] is None}),
        "r429_retry_after": sum(1 for c in clients if c["status"] == 429 and c["retry_after"]),
        "ttfb_p50_ms": ms(percentile([c["ttfb"] for c in clients], 50)),
        "ttfb_max_ms": ms(percentile([c["ttfb"] for c in clients], 100)),
        "after_status": probe.status, "after_lost": probe.lost,
        "after_latency_ms": ms(probe.latency), "single_client_static_p50_ms": single_p50_ms,
        "cancelled_requests_delta": delta(before[0], after[0]),
        "jobs_cancelled_delta": delta(before[1], after[1]),
        "in_flight_end": health.get("in_flight") if health else None,
        "queue_depth_end": health.get("queue_depth") if health else None,
        "settle_s": round(settle_s, 2),
    }


# ---------------------------------------------------------------- printing


def fmt(value):
    return "n/a" if value is None else str(value)


def signed(value):
    return "n/a" if value is None else f"{value:+d}"


def print_table(headers, rows):
    if not rows:
        print("  (nothing ran)")
        return
    widths = [max(len(h), *(len(fmt(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(fmt(v).rjust(w) for v, w in zip(r, widths)))


def print_load(rows):
    print("\nload phase (latency of 200 responses; req/s = 200s per second of wall time)")
    headers = ["mode", "conc", "sent", "200", "429", "429+RA", "other", "LOST", "mixed",
               "req/s", "p50 ms", "p99 ms"]
    table = [[r["mode"], r["concurrency"], r["sent"], r["ok"], r["r429"], r["r429_retry_after"],
              ",".join(f"{k}:{v}" for k, v in sorted(r["other"].items())) or "-",
              r["lost"], r["mixed_up"], r["req_per_s"], r["p50_ms"], r["p99_ms"]]
             for r in rows]
    print_table(headers, table)
    for r in rows:
        notes = []
        if r["lost_reasons"]:
            notes.append("lost: " + ", ".join(f"{k} x{v}" for k, v in r["lost_reasons"].items()))
        if r["skipped"]:
            notes.append(f"{r['skipped']} not sent (time cap)")
        if r["unchecked"]:
            notes.append(f"{r['unchecked']} 200s without a reference to check against")
        if r["wrong_mode"]:
            notes.append(f"{r['wrong_mode']} 200s report another rag.mode")
        if notes:
            print(f"  {r['mode']} x{r['concurrency']}: " + "; ".join(notes))


def print_storm(s):
    print(f"\nhang-up storm ({s['clients']} streamed tta clients, closed after the first bytes)")
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(s["first_bytes_statuses"].items()))
    print(f"  first answers by status  {statuses} (429 with Retry-After: {s['r429_retry_after']})")
    if s["lost"]:
        print(f"  LOST before any byte     {s['lost']} ({', '.join(s['lost_reasons'])})")
    print(f"  time to first byte       p50 {fmt(s['ttfb_p50_ms'])} ms, "
          f"max {fmt(s['ttfb_max_ms'])} ms")
    after = (f"{fmt(s['after_latency_ms'])} ms (status {s['after_status']})"
             if s["after_lost"] is None else f"LOST ({s['after_lost']})")
    print(f"  static request after it  {after}; "
          f"single-client static p50 {fmt(s['single_client_static_p50_ms'])} ms")
    print(f"  cancelled requests       {signed(s['cancelled_requests_delta'])} "
          "(ttarag_requests_total{status=\"cancelled\"})")
    print(f"  cancelled jobs           {signed(s['jobs_cancelled_delta'])} "
          "(ttarag_jobs_cancelled_total)")
    print(f"  /health in_flight at end {fmt(s['in_flight_end'])} "
          f"(queue_depth {fmt(s['queue_depth_end'])}, waited {s['settle_s']} s)")


# ---------------------------------------------------------------- main


def single_client_static_p50(rows):
    """The load phase's static p50 at the lowest concurrency run (1 by default)."""
    static = [r for r in rows if r["mode"] == "static" and r["p50_ms"] is not None]
    return min(static, key=lambda r: r["concurrency"])["p50_ms"] if static else None


async def run(args):
    clock = Clock(args.time_cap)
    questions = load_questions(args.questions, args.requests)
    health = await read_health(args, clock)
    if health is None:
        print(f"load.py: error: no server answers /health at {args.base} "
              "(start one with `make run`)", file=sys.stderr)
        return 1, {}
    print(f"server {args.base}: model {fmt(health.get('model'))}, "
          f"workers {fmt(health.get('workers'))}, "
          f"queue capacity {fmt(health.get('queue_capacity'))}")

    refs, ref_failures = await take_references(args, clock, questions)
    print(f"\nreference passages: {len(refs)} of {len(dict.fromkeys(questions))} questions"
          + (f"; failed: {sorted(set(ref_failures.values()))}" if ref_failures else ""))
    if not args.no_warmup:
        await warm_up(args, clock, questions)
    rows, everything = await load_phase(args, clock, questions, refs)
    print_load(rows)
    variants = text_variants(everything)
    print(f"  answers that differed between requests for the same (mode, question), "
          f"informational: {variants}")

    storm = None
    if args.storm and clock.left() > 0:
        storm = await storm_phase(args, clock, questions, single_client_static_p50(rows))
        print_storm(storm)

    lost = sum(r["lost"] for r in rows)
    if storm:
        lost += storm["lost"] + (1 if storm["after_lost"] else 0)
    mixed = sum(r["mixed_up"] for r in rows)
    ok = sum(r["ok"] for r in rows)
    sent = sum(r["sent"] for r in rows)
    failed = bool(lost or mixed or ref_failures or clock.hit)
    summary = (f"{'FAIL' if failed else 'OK'}: {sent} load requests, {ok} answered 200, "
               f"{lost} lost, {mixed} mixed up"
               + (f", {len(ref_failures)} references missing" if ref_failures else "")
               + (", stopped by the time cap" if clock.hit else ""))
    figures = {"base": args.base, "settings": {
                   "concurrency": args.concurrency, "modes": args.modes,
                   "requests": args.requests, "max_tokens": args.max_tokens, "seed": args.seed,
                   "storm": args.storm, "storm_max_tokens": args.storm_max_tokens,
                   "timeout_s": args.timeout, "time_cap_s": args.time_cap},
               "health_start": health, "references": refs,
               "reference_failures": ref_failures, "load": rows,
               "text_variants": variants, "storm": storm,
               "summary": {"lost": lost, "mixed_up": mixed, "time_cap_hit": clock.hit,
                           "ok": not failed, "line": summary}}
    print("\n" + summary)
    return (1 if failed else 0), figures


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        code, figures = asyncio.run(run(args))
    except (OSError, ValueError) as e:
        print(f"load.py: error: {e}", file=sys.stderr)
        return 1
    if args.json and figures:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    return code


if __name__ == "__main__":
    sys.exit(main())
