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
