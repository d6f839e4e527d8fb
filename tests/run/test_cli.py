"""The `minitron` command line (run/cli.py): `convert` / `export` (HF -> orbax -> HF) is lossless, also onto a
mesh; errors and bad `key=value` words are one-line messages, not tracebacks; and paths that would overwrite
an input, paths of the wrong kind and a missing or too-large tokenizer are refused before any model loads."""

import numpy as np
import pytest
from helpers import save_tiny

from minitron_jax.io.hf import open_checkpoint
from minitron_jax.run.cli import main


def tensors(path):
    return {n: np.asarray(f.tensor(n)).tobytes() for n, f in open_checkpoint(path).items()}


@pytest.mark.parametrize("mesh", [None, "2,2,2"])
def test_convert_then_export_is_lossless(tmp_path, mesh):
    save_tiny(tmp_path / "src", num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    extra = ["--mesh", mesh] if mesh else []
    main(["convert", str(tmp_path / "src"), str(tmp_path / "ckpt"), *extra])
    assert (tmp_path / "ckpt" / "params").is_dir() and (tmp_path / "ckpt" / "config.json").exists()
    main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), *extra])
    assert tensors(tmp_path / "src") == tensors(tmp_path / "out")


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="config.json does not exist"):
        main(["convert", str(tmp_path / "empty" ), str(tmp_path / "ckpt")])
    with pytest.raises(SystemExit, match="not a minitron checkpoint"):
        main(["export", str(tmp_path / "empty"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="DATA,FSDP,TENSOR"):
        main(["convert", str(tmp_path / "empty"), str(tmp_path / "ckpt"), "--mesh", "2x2"])


LLAMA = "configs/llama31_8b_config.json"


def test_config_overrides_and_their_errors_from_the_command_line(capsys):
    """`run`, `plan`, `distill` and `finetune` read `key=value` words with the one configuration loader:
    dotted keys reach their section, and a wrong key or value stops before any work, naming the fix."""
    main(["run", "configs/pipeline_llama31_8b_depth_gpu.yaml", "distill.steps=4980", "distill.batch_size=576",
          "--dry-run", "--devices", "64", "--peak-tflops", "459"])
    assert f"{4980 * 576 * 8192:,} tokens" in capsys.readouterr().out
    for argv, msg in (
            (["run", "score.samplez=3"], r"minitron run: unknown score keys \['samplez'\]; valid keys: samples,"),
            (["run", "distill.mesh.data=2"], r"minitron run: distill.mesh takes a value \(list\[int\]\), not keys"),
            (["plan", "configs/llama31_8b_to_4b_depth_gpu.yaml", "stepz=3", "--teacher", LLAMA, "--devices", "8",
              "--peak-tflops", "1"], r"minitron plan: unknown recipe keys \['stepz'\]"),
            (["distill", "teacher=t", "student=s", "data=d", "steps=20"],
             r"minitron distill: warmup=40 must be below steps=20: set warmup=2 \(steps/10\) or more steps"),
            (["finetune", "model=m", "data=d", "lr=fast"], r"minitron finetune: lr='fast' is not a valid float")):
        with pytest.raises(SystemExit, match=msg):
            main(argv)


# ---------------------------------------------------------------------------- refusals before work
@pytest.fixture
def no_model_loads(monkeypatch):
    """Any weight load fails the test: each refusal below must come before the model is read."""
    import minitron_jax.io.hf as hf

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the problem was reported")
    monkeypatch.setattr(hf, "from_pretrained", boom)


def listing(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_prune_never_writes_over_its_inputs(tmp_path, no_model_loads):
    """`prune --out D --overwrite` with the teacher and scores inside D used to wipe D; with --out equal to
    the model it destroyed the source. Both are refused before the model loads, and nothing is touched."""
    d = tmp_path / "D"
    save_tiny(d / "teacher")
    (d / "scores.safetensors").write_bytes(b"scores")
    (d / "notes.txt").write_text("unrelated")
    before = listing(d)
    base = ["prune", "--model", str(d / "teacher"), "--scores", str(d / "scores.safetensors"),
            "--target", "hidden_size=32", "--overwrite"]
    for out, msg in ((d, r"the input .* is inside output .*D, which would be replaced"),
                     (d / "teacher", r"output .*teacher is the input"),
                     (d / "teacher" / "pruned", r"output .*pruned is inside the input")):
        with pytest.raises(SystemExit, match=r"^minitron prune: " + msg):
            main([*base, "--out", str(out)])
    assert listing(d) == before
    other = tmp_path / "other"  # not an input, but not written by minitron either: refused, kept
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"exists and was not written by minitron.*keep\.txt"):
        main([*base, "--out", str(other)])
    assert (other / "keep.txt").read_text() == "mine"


def test_paths_of_the_wrong_kind_are_one_line_messages(tmp_path, no_model_loads):
    save_tiny(tmp_path / "m")
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "scores.safetensors").write_bytes(b"x")
    (tmp_path / "afile").write_text("x")
    cases = [
        (["prune", "--model", str(tmp_path / "m"), "--scores", str(tmp_path / "scores"), "--target", "hidden_size=32",
          "--out", str(tmp_path / "p")], r"--scores .*scores is a directory; .*did you mean --scores .*scores\.safetensors"),
        (["prune", "--model", str(tmp_path / "m"), "--scores", str(tmp_path / "nope.safetensors"), "--target",
          "hidden_size=32", "--out", str(tmp_path / "p")], r"--scores .*nope\.safetensors does not exist; run `minitron score"),
        (["prune", "--model", str(tmp_path / "m"), "--scores", str(tmp_path / "scores" / "scores.safetensors"),
          "--target", "hidden_size=32", "--out", str(tmp_path / "afile" / "p")], r"under .*afile, which is a file"),
        (["score", "--model", str(tmp_path / "m"), "--data", str(tmp_path), "--out", str(tmp_path / "afile" / "s")],
         r"--out .*afile is a file, not a directory"),
        (["convert", str(tmp_path / "m"), str(tmp_path / "m" / "ckpt")], r"output .*ckpt is inside the input"),
        (["convert", str(tmp_path / "m"), str(tmp_path / "ckpt"), "--mesh", "1,-1,3"],
         r"--mesh 1,-1,3: mesh .* does not fit 8 devices"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit, match=msg):
            main(argv)


def test_model_without_tokenizer_or_with_a_larger_one_is_refused_before_loading(tmp_path, no_model_loads):
    """No tokenizer files: say so (it used to ask for sentencepiece). A tokenizer with more tokens than the
    embedding: ids past the embedding gave NaN scores, a NaN eval loss with exit 0, and a NaN distillation."""
    import shutil

    from minitron_jax.core.assets import fetch_smollm2
    save_tiny(tmp_path / "m")  # vocab 128, no tokenizer files
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 50)
    for cmd in (["score", "--out", str(tmp_path / "s")], ["eval"]):
        with pytest.raises(SystemExit, match=r"tokenizer"):
            main([cmd[0], "--model", str(tmp_path / "m"), "--data", str(text), *cmd[1:]])
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (fetch_smollm2() / name).exists():
            shutil.copy(fetch_smollm2() / name, tmp_path / "m" / name)
    for cmd in (["score", "--out", str(tmp_path / "s")], ["eval"]):
        with pytest.raises(SystemExit, match=r"49152.*128|128.*49152"):
            main([cmd[0], "--model", str(tmp_path / "m"), "--data", str(text), *cmd[1:]])
    assert not (tmp_path / "s" / "scores.safetensors").exists()


@pytest.mark.parametrize("mesh,batch,rows,sizes", [("1,8,1", 12, 8, "8 or 16"), ("8,1,1", 4, 8, "8"),
                                                   ("2,2,2", 6, 4, "4 or 8")])
def test_score_eval_and_prune_refuse_a_batch_that_does_not_split_before_loading(pair, tmp_path, no_model_loads,
                                                                                no_weight_reads, mesh, batch, rows,
                                                                                sizes):
    """--batch-size rows that the mesh's data x fsdp devices do not divide would be replicated, not split (every
    device computing every row: the activation memory `plan --compile` reports, times the devices). score, eval
    and prune --params (which ranks by forward passes) refuse them, naming sizes that split, before the data is
    read or a model loads."""
    teacher, _, _ = pair
    msg = (rf"--batch-size {batch} does not split over the mesh's data x fsdp = {rows} devices \(its rows would be "
           rf"replicated, not split\); give a multiple of {rows}, e.g. {sizes}$")
    nowhere = str(tmp_path / "no_data")
    (tmp_path / "scores.safetensors").write_bytes(b"")
    for argv in (["score", "--out", str(tmp_path / "s")], ["eval"],
                 ["prune", "--params", "100K", "--scores", str(tmp_path / "scores.safetensors"), "--out",
                  str(tmp_path / "p")]):
        with pytest.raises(SystemExit, match=rf"^minitron {argv[0]}: {msg}"):
            main([argv[0], "--model", str(teacher), "--data", nowhere, *argv[1:], "--batch-size", str(batch),
                  "--mesh", mesh])
    assert not (tmp_path / "s").exists() and not (tmp_path / "p").exists()


def test_eval_of_a_run_uses_the_split_seed_it_trained_with(pair, tmp_path):
    """`minitron eval --model OUT` (or OUT/student_hf) draws --holdout-fraction's documents with the split_seed
    of OUT/recipe.json: the same scores as the exported student given that --split-seed; another --split-seed
    than the run's is refused, naming both."""
    import json
    import shutil

    from minitron_jax.core.yaml_config import dump
    from minitron_jax.data.text import read_documents, split_documents
    from minitron_jax.train.run_config import RunConfig

    teacher, student, data = pair
    docs = read_documents(data)
    a, b = 1, 0
    assert split_documents(docs, (), 0.34, a)[1] != split_documents(docs, (), 0.34, b)[1]
    out = tmp_path / "run"
    shutil.copytree(student, out / "student_hf")
    rc = RunConfig(teacher=str(teacher), student=str(student), data=str(data), holdout_fraction=0.34, split_seed=a)
    (out / "recipe.json").write_text(dump(rc))
    common = ["--data", str(data), "--holdout-fraction", "0.34", "--samples", "2", "--seq-len", "32",
              "--task-items", "4", "--json", str(tmp_path / "r.json")]

    def evaluate(model, *extra):
        main(["eval", "--model", str(model), *common, *extra])
        return json.loads((tmp_path / "r.json").read_text())

    run, exported = evaluate(out), evaluate(out / "student_hf", "--split-seed", str(a))
    plain, other = evaluate(student, "--split-seed", str(a)), evaluate(student, "--split-seed", str(b))
    assert run["split_seed"] == exported["split_seed"] == plain["split_seed"] == a and other["split_seed"] == b
    assert run["loss"] == exported["loss"] == plain["loss"] != other["loss"]
    for model in (out, out / "student_hf"):
        with pytest.raises(SystemExit, match=rf"--split-seed {b}, but .*student_hf was trained with split_seed={a} "
                                             rf"\(.*recipe.json\).*pass --split-seed {a}"):
            main(["eval", "--model", str(model), *common, "--split-seed", str(b)])
    shutil.rmtree(out / "student_hf")
    with pytest.raises(SystemExit, match=r"a training run's out without the student it exports .*export=false"):
        main(["eval", "--model", str(out), *common])
