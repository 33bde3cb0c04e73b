import sys, threading, random, time, json, httpx
from server import start
port = int(sys.argv[1]); nconv = int(sys.argv[2]); args = sys.argv[3:]
p, url = start(port, ["--max-queue", "200", *args])
words = open("README.md").read().split()
MODEL = httpx.get(url + "/v1/models").json()["data"][0]["id"]
codes, bad = [], []
def settings(r):
    if r.random() < 0.3: return None
    pol = r.choice(["loopserve", "snapkv", "h2o", "streaming", "full", None])
    d = {"policy": pol} if pol else {}
    if pol != "full": d["budget"] = r.choice([128, 256, 512, None])
    if pol in ("loopserve", None) and r.random() < 0.5: d["defer_cut"] = r.choice([0, 4, 64])
    if r.random() < 0.2: d["interval"] = r.choice([8, 16, 64])
    return d
def conv(i):
    r = random.Random(i); msgs = []; did = f"c{i}" if r.random() < 0.5 else None
    for t in range(4):
        k = r.choice([10, 100, 400]); s = r.randrange(len(words) - k)
        msgs.append({"role": "user", "content": " ".join(words[s:s + k]) + " Summarise that."})
        body = {"model": MODEL, "messages": msgs, "temperature": r.choice([0, 0.8]), "max_tokens": r.choice([4, 30, 80])}
        ls = settings(r)
        if ls is not None: body["loopserve"] = ls
        hdr = {"X-Dialogue-Id": did} if did else {}
        try:
            if r.random() < 0.4:
                body["stream"] = True; got = ""
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=hdr, timeout=900) as sr:
                    if sr.status_code != 200:
                        codes.append(sr.status_code); sr.read(); bad.append((i, t, sr.status_code, sr.text[:300])); return
                    n = 0
                    for line in sr.iter_lines():
                        if line.startswith("data: {"):
                            ch = json.loads(line[6:])["choices"]
                            if ch and ch[0]["delta"].get("content"): got += ch[0]["delta"]["content"]
                            n += 1
                            if n >= r.choice([2, 5, 1000]): break
                codes.append("stream")
                msgs.append({"role": "assistant", "content": got})
            else:
                resp = httpx.post(url + "/v1/chat/completions", json=body, headers=hdr, timeout=900)
                codes.append(resp.status_code)
                if resp.status_code != 200:
                    bad.append((i, t, resp.status_code, resp.text[:300]))
                    if resp.status_code >= 500: return
                    msgs.pop(); continue
                msgs.append({"role": "assistant", "content": resp.json()["choices"][0]["message"]["content"]})
        except Exception as e:
            codes.append(type(e).__name__); bad.append((i, t, repr(e)[:200])); return
ts = [threading.Thread(target=conv, args=(i,)) for i in range(nconv)]
t0 = time.time()
[t.start() for t in ts]; [t.join() for t in ts]
m = httpx.get(url + "/metrics").text
print({str(c): codes.count(c) for c in set(codes)}, f"{time.time()-t0:.0f}s")
for b in bad: print(b)
print([l for l in m.splitlines() if l.startswith(("loopserve_decode_waits_total", "loopserve_decode_batch_mean", "loopserve_kv_swaps_out_total"))])
p.terminate(); p.wait()
