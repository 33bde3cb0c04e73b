"""The multi-turn long-context benchmark (`loopserve-edge bench`).

tasks/      the eleven task families (generators of dialogues with known answers)
dialogues   dialogue structure, question positions, fitting to a context length
material    filler, needles, synthetic words;  data: the real data, read in place
scoring     exact / contains / numeric / choice match, ROUGE-L
fidelity    teacher-forced comparison with full attention (same greedy token, KL)
methods     the compared methods and their configurations
harness     runs methods on the same dialogues, resumable, one JSON line per run
report      the markdown and CSV summary;  plots: the PNG plots
"""
