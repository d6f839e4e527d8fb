"""`minitron convert` / `minitron export`: HF -> orbax -> HF is lossless, also onto a mesh."""

import numpy as np
import pytest

from minitron_jax.cli import main
from minitron_jax.hf import open_checkpoint
from helpers import save_tiny


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
