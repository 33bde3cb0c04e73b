"""replay.py [--text] PORT N SEED ARGS...: N concurrent greedy conversations x 4 turns against
`loopserve-edge serve ARGS` on PORT (random passages of the README, random per-request LoopServe
settings and lengths, 40% streamed to the end), then every request sent again, one conversation
at a time, to a fresh server with the same ARGS on PORT + 1. With batch-invariant attention (the
server's default) each reply should be the one it got alone; each that is not is printed (its
text and finish reason both ways). Chat (/v1/chat/completions; half the conversations with an
X-Dialogue-Id), or with --text /v1/completions: each conversation one growing text (the last
prompt, its reply, a new passage and a question), found again by its text."""
import sys, threading, random, time, json, httpx
sys.path.insert(0, "benchmarks/results/serve/concurrency-s48")
from server import start
TEXT = sys.argv[1] == "--text"
argv = sys.argv[2:] if TEXT else sys.argv[1:]
port = int(argv[0]); nconv = int(argv[1]); seed = int(argv[2]); args = argv[3:]
ROUTE, FIELD = ("/v1/completions", "text") if TEXT else ("/v1/chat/completions", "content")
words = open("README.md").read().split()
def settings(r):
    if r.random() < 0.3: return None
    pol = r.choice(["loopserve", "snapkv", "h2o", "streaming", None])
    d = {"policy": pol} if pol else {}
    d["budget"] = r.choice([128, 192, 256])
    if pol in ("loopserve", None) and r.random() < 0.5: d["defer_cut"] = r.choice([0, 4, 64])
    if r.random() < 0.3: d["interval"] = r.choice([8, 16, 64])
    return d
def post(url, body, hdr, stream):
    if not stream:
        resp = httpx.post(url + ROUTE, json=body, headers=hdr, timeout=1800)
        if resp.status_code != 200: return f"HTTP {resp.status_code} {resp.text[:200]}"
        c = resp.json()["choices"][0]
        return (c["text"] if TEXT else c["message"]["content"]) + f" [{c['finish_reason']}]"
    got, fin = "", None
    body = dict(body, stream=True)
    with httpx.stream("POST", url + ROUTE, json=body, headers=hdr, timeout=1800) as sr:
        if sr.status_code != 200: sr.read(); return f"HTTP {sr.status_code} {sr.text[:200]}"
        for line in sr.iter_lines():
            if line.startswith("data: {"):
                ch = json.loads(line[6:])["choices"]
                piece = ch and (ch[0].get("text") if TEXT else ch[0]["delta"].get("content"))
                if piece: got += piece
                if ch and ch[0].get("finish_reason"): fin = ch[0]["finish_reason"]
    return got + f" [{fin}]"
def conv(url, i, rec):
    r = random.Random(seed * 1000 + i); msgs = []; text = ""
    did = None if TEXT else (f"c{i}" if r.random() < 0.5 else None)
    for t in range(4):
        k = r.choice([10, 100, 300]); s = r.randrange(len(words) - k)
        if TEXT:
            text += " ".join(words[s:s + k]) + "\nQuestion: what is that about?\nAnswer:"
            body = {"model": MODEL, "prompt": text, "temperature": 0, "max_tokens": r.choice([4, 30, 80])}
        else:
            msgs.append({"role": "user", "content": " ".join(words[s:s + k]) + " Summarise that."})
            body = {"model": MODEL, "messages": list(msgs), "temperature": 0, "max_tokens": r.choice([4, 30, 80])}
        ls = settings(r)
        if ls is not None: body["loopserve"] = ls
        hdr = {"X-Dialogue-Id": did} if did else {}
        stream = r.random() < 0.4
        out = post(url, body, hdr, stream)
        rec.append((i, t, body, hdr, stream, out))
        reply = out.rsplit(" [", 1)[0]
        if TEXT:
            text = text[:text.rfind("\n", 0, len(text) - 30) + 1] if out.startswith("HTTP ") else text + reply + "\n"
        elif out.startswith("HTTP "):
            msgs.pop()
        else:
            msgs.append({"role": "assistant", "content": reply})
def metrics(url):
    m = httpx.get(url + "/metrics").text
    return [l for l in m.splitlines() if l.startswith(("loopserve_decode_waits_total", "loopserve_decode_batch_mean", "loopserve_kv_swaps_out_total"))]
p, url = start(port, ["--max-queue", "200", *args]); MODEL = httpx.get(url + "/v1/models").json()["data"][0]["id"]
rec = []
ts = [threading.Thread(target=conv, args=(url, i, rec)) for i in range(nconv)]
t0 = time.time(); [t.start() for t in ts]; [t.join() for t in ts]
print(f"concurrent: {len(rec)} requests {time.time()-t0:.0f}s", metrics(url))
json.dump(rec, open(f"/tmp/replay-rec{port}.json", "w"))   # the requests, to replay one conversation
p.terminate(); p.wait()
p, url = start(port + 1, ["--max-queue", "200", *args])
t0 = time.time(); same = diff = 0
by = sorted(rec, key=lambda x: (x[0], x[1]))
for (i, t, body, hdr, stream, out) in by:
    alone = post(url, body, hdr, stream)
    if alone == out: same += 1
    else:
        diff += 1
        print("DIFF", i, t, body.get("loopserve"), "stream" if stream else "", "\n  concurrent:", repr(out[:150]), "\n  alone:     ", repr(alone[:150]))
print(f"alone: {time.time()-t0:.0f}s same {same} diff {diff}")
p.terminate(); p.wait()
