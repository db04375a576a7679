"""A bounded load test of a running `prolora serve` (Python standard library only): `--clients`
threads send `--requests` completions in all, round-robin over `--models`, some streamed, and
every `--kill-every`-th one is a stream its client closes after the first event. It stops by
itself, then checks that every request was answered completely or refused with 429, that no
row stayed in the batch, and (with `--pid`) the server's resident memory before and after.

    prolora serve --model tiny --adapter-root ADAPTERS --max-batch 32 --max-queue 32 --port 8000
    python scripts/bench/serve_load.py --base-url http://127.0.0.1:8000 --models a b c --pid PID
"""

import argparse
import http.client
import json
import statistics
import threading
import time
from urllib.parse import urlparse


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Client:
    def __init__(self, url, key, timeout):
        u = urlparse(url)
        self.host, self.port, self.key, self.timeout = u.hostname, u.port, key, timeout

    def request(self, method, path, body=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers=headers)
        return conn, conn.getresponse()


def metric(client, name):
    conn, r = client.request("GET", "/metrics")
    text = r.read().decode()
    conn.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kill-every", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--pid", type=int, default=None)
    args = ap.parse_args()
    client = Client(args.base_url, args.api_key, args.timeout)

    rss_before = rss_kib(args.pid) if args.pid else None
    lock = threading.Lock()
    counter = iter(range(args.requests))
    results = []  # (kind, status, latency_s, tokens, complete)

    def one(i):
        model = args.models[i % len(args.models)]
        killed = args.kill_every > 0 and i % args.kill_every == args.kill_every - 1
        stream = killed or i % 3 == 0
        body = {"model": model, "prompt": f"Request {i}: tell me a story", "temperature": 0.7,
                "seed": i, "max_tokens": args.max_tokens, "stream": stream}
        start = time.perf_counter()
        conn, r = client.request("POST", "/v1/completions", body)
        try:
            if r.status != 200:
                r.read()
                if r.status == 429:
                    # As the openai client does: wait as told before the next request.
                    time.sleep(float(r.getheader("Retry-After", "1")))
                return ("killed" if killed else "plain", r.status, time.perf_counter() - start, 0,
                        r.status == 429)
            if killed:
                r.fp.readline()  # the first event, then the client goes away
                return ("killed", 200, time.perf_counter() - start, 0, True)
            if not stream:
                answer = json.loads(r.read())
                tokens = answer["usage"]["completion_tokens"]
                complete = answer["choices"][0]["finish_reason"] in ("stop", "length")
                return ("plain", 200, time.perf_counter() - start, tokens, complete)
            tokens, done, finished = 0, False, False
            for raw in r:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if chunk["choices"][0]["finish_reason"]:
                        finished = True
                        tokens = chunk["usage"]["completion_tokens"]
            return ("stream", 200, time.perf_counter() - start, tokens, done and finished)
        finally:
            conn.close()

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                result = one(i)
            except Exception as e:  # noqa: BLE001 (a lost request is what this counts)
                result = ("error", 0, 0.0, 0, False)
                print(f"request {i}: {type(e).__name__}: {e}")
            with lock:
                results.append(result)

    wall = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall

    # No row stays in the batch once every client is gone.
    waited = time.perf_counter()
    while metric(client, "prolora_running_rows") > 0 or metric(client, "prolora_queue_depth") > 0:
        if time.perf_counter() - waited > 30:
            break
        time.sleep(0.1)
    running = metric(client, "prolora_running_rows")
    queued = metric(client, "prolora_queue_depth")

    by_status = {}
    for kind, status, *_ in results:
        by_status[(kind, status)] = by_status.get((kind, status), 0) + 1
    answered = [r for r in results if r[1] == 200 and r[0] != "killed"]
    lost = [r for r in results if not r[4]]
    latencies = sorted(r[2] for r in answered)
    tokens = sum(r[3] for r in answered)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0] * 99
    print(f"requests: {len(results)} of {args.requests} sent by {args.clients} clients over "
          f"{len(args.models)} models in {wall:.1f} s")
    for (kind, status), n in sorted(by_status.items()):
        print(f"  {kind:7s} {status}: {n}")
    print(f"lost or incomplete: {len(lost)}")
    print(f"latency of complete answers: p50 {q[49]:.3f} s, p99 {q[98]:.3f} s")
    print(f"output tokens/s: {tokens / wall:.1f} ({tokens} tokens)")
    print(f"after the run: running rows {running:.0f}, queue depth {queued:.0f}")
    if args.pid:
        print(f"server RSS: {rss_before} KiB before, {rss_kib(args.pid)} KiB after")
    ok = len(results) == args.requests and not lost and running == 0 and queued == 0
    print("PASS" if ok else "FAIL")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
