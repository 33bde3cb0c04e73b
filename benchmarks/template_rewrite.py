"""Turns of a budgeted dialogue whose chat template drops each past reply's thinking, as reasoning
models' templates do (Qwen3's, DeepSeek-R1's): what each turn prefills and its time to the first
token.

    python benchmarks/template_rewrite.py [--model M.gguf] [--budget 512] [--turns 8]

The model's GGUF is copied with a ChatML template that renders a past assistant message as the
text after its `</think>` (gguf-new-metadata; the weights unchanged), and each reply is held by a
grammar to `<think> ... </think>` and a short answer, so the default model writes what a reasoning
model would. Each turn sends a real passage and a question (../shared/data). With the rewrite
found by text spans (text_spans.py) a turn prefills the last reply's answer and its new message;
before, a dialogue whose cache a cut had thinned prefilled its whole conversation again.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from loopserve_edge.bench.data import passages_and_questions

THINKING = (
    "{% for message in messages %}"
    "{% set c = message['content'] %}"
    "{% if message['role'] == 'assistant' %}{% set c = c.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + c + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
REPLY = 'root ::= "<think>\\n" [a-z ,.]{150,200} "\\n</think>\\n\\n" [A-Za-z ]{10,40}'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the default model)")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from loopserve_edge import Llama, LoopServeConfig
    from loopserve_edge.paths import default_model

    src = Path(args.model) if args.model else default_model()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "thinking.gguf"
        subprocess.run([str(Path(sys.executable).parent / "gguf-new-metadata"), str(src), str(model),
                        "--chat-template", THINKING, "--force"], check=True, capture_output=True)
        llm = Llama(model, n_ctx=4096, n_threads=args.threads,
                    loopserve=LoopServeConfig(policy="loopserve", budget=args.budget))
        items = list(passages_and_questions(args.turns))
        d = llm.dialogue(system="Answer from the passages.")
        print(f"{src.name}, a template that drops past thinking, loopserve budget {args.budget}, "
              f"{args.threads} threads, replies held to <think> (150-200 characters) and an answer\n")
        print("| turn | prompt tokens | reused | prefilled | TTFT s | KV cells after | evicted so far |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for k, (title, passage, question) in enumerate(items, start=1):
            d.send(f"{title}: {passage}\n\nQuestion: {question}", temperature=0, max_tokens=200, grammar=REPLY)
            s = d.last_stats
            print(f"| {k} | {s.prompt_tokens} | {s.reused_tokens} | {s.prefilled_tokens} | {s.ttft_s:.2f} | "
                  f"{s.kv_cells} | {s.kv_evicted} |", flush=True)
        llm.close()


if __name__ == "__main__":
    main()
