"""compare_dumps.py CONCURRENT ALONE: the two servers' dumps (dump_hook.diff) of one replay, step by
step: a step is keyed by its dialogue's tokens so far, its token and position (a prefill by its
chunk's tokens and positions); prints, for the steps both servers took, how many had bit-identical
logits, by kind (B: decode_batch, P: a prefill chunk's last row) and by the concurrent batch's
size, and the first steps that differed."""
import collections
import json
import sys

conc = [json.loads(line) for line in open(sys.argv[1])]
alone = {r[1]: r for r in map(json.loads, open(sys.argv[2]))}
tally = collections.Counter()
shown = 0
for r in conc:
    if r[1] not in alone:
        continue
    same = alone[r[1]][4] == r[4]
    tally[(r[0], r[6] if r[0] == "B" else "-", same)] += 1
    if not same and shown < 5:
        shown += 1
        print("differs:", r[0], "token", r[2], "position", r[3], "batch of", r[6], "seq", r[7])
for k in sorted(tally, key=str):
    print(f"{k[0]} batch {k[1]}: {'same' if k[2] else 'differ'} {tally[k]}")
print(f"steps compared {sum(tally.values())}, same {sum(v for k, v in tally.items() if k[2])}")
