import sys, threading, random, time, httpx
from server import start
port = int(sys.argv[1]); args = sys.argv[2:]
p, url = start(port, args)
words = open("README.md").read().split()
codes = []
def conv(i):
    r = random.Random(i); prompt = ""
    for t in range(3):
        k = r.choice([20, 200, 600]); s = r.randrange(len(words) - k)
        prompt += " ".join(words[s:s + k]) + "\nQuestion: what is it about?\nAnswer:"
        if r.random() < 0.4:   # streamed, the client gone after a few pieces; it goes on with what it got
            got = ""
            try:
                with httpx.stream("POST", url + "/v1/completions", json={"prompt": prompt, "max_tokens": 40,
                                  "temperature": 0, "stream": True}, timeout=600) as sr:
                    if sr.status_code != 200: print(i, t, "stream", sr.status_code); codes.append(sr.status_code); return
                    n = 0
                    for line in sr.iter_lines():
                        if line.startswith("data: {"):
                            import json; got += json.loads(line[6:])["choices"][0]["text"]; n += 1
                            if n >= r.choice([1, 3, 6]): break
                codes.append("cancelled")
            except Exception as e:
                codes.append(str(e)); return
            prompt += got + "\n"
            continue
        try:
            resp = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": r.choice([8, 40]),
                              "temperature": 0}, timeout=600)
            codes.append(resp.status_code)
            if resp.status_code != 200: print(i, t, resp.status_code, resp.text[:200]); return
            prompt += resp.json()["choices"][0]["text"] + "\n"
        except Exception as e:
            codes.append(str(e)); return
ts = [threading.Thread(target=conv, args=(i,)) for i in range(30)]
t0 = time.time()
[t.start() for t in ts]; [t.join() for t in ts]
m = httpx.get(url + "/metrics").text
print({c: codes.count(c) for c in set(codes)}, f"{time.time()-t0:.0f}s")
print([l for l in m.splitlines() if l.startswith(("loopserve_decode_waits_total", "loopserve_decode_batch_mean", "loopserve_kv_swaps_out_total"))])
p.terminate(); p.wait()
