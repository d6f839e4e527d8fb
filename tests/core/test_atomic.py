"""Outputs (atomic.py, save_model, save_params): --overwrite replaces only what minitron wrote, never an
input; the old copy goes only once the new one is in place; concurrent writers never share a temporary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY

import minitron_jax.core.atomic as atomic
from minitron_jax.core.atomic import MARKER, atomic_directory, check_output, is_minitron_output
from minitron_jax.core.errors import OutputError
from minitron_jax.io.hf import from_pretrained, save_params, save_pretrained
from minitron_jax.io.orbax_model import load_model, save_model
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import Llama, is_param_spec, param_specs


def tiny_model(seed: int = 0) -> Llama:
    cfg = LlamaConfig(**TINY)
    specs, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=is_param_spec)
    rng = np.random.default_rng(seed)
    return Llama(cfg, params=jax.tree.unflatten(
        treedef, [jnp.asarray(0.02 * rng.standard_normal(s.shape, dtype=np.float32)) for s in specs]))


def listing(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def q_proj(path: Path) -> np.ndarray:
    return np.asarray(from_pretrained(path).params()["layers"]["q_proj"])


@pytest.fixture
def workdir(tmp_path) -> Path:
    """D: a teacher, its scores and an unrelated file, none written by `atomic_directory`."""
    d = tmp_path / "D"
    (d / "teacher").mkdir(parents=True)
    (d / "teacher" / "config.json").write_text("{}")
    (d / "scores.safetensors").write_bytes(b"scores")
    (d / "notes.txt").write_text("mine")
    return d


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ---------------------------------------------------------------------------- never delete what is not ours
def test_overwrite_refuses_a_directory_minitron_did_not_write(workdir):
    before = listing(workdir)
    model = tiny_model()
    with pytest.raises(OutputError, match=rf"output {workdir} exists and was not written by minitron "
                                          rf"\(no \{MARKER}\).*would delete notes\.txt, scores\.safetensors, "
                                          r"teacher/: choose another path, or delete it by hand"):
        save_params(model.params(), model.config, workdir, overwrite=True)
    with pytest.raises(OutputError, match="not written by minitron"):
        save_model(model, workdir, overwrite=True)
    assert listing(workdir) == before
    assert sorted(p.name for p in workdir.parent.iterdir()) == ["D"]  # no temporary left either


def test_prune_into_the_directory_holding_its_inputs_is_refused(workdir):
    """`minitron prune --model D/teacher --scores D/scores.safetensors --out D --overwrite`, even if D
    carried the marker of an earlier minitron output."""
    (workdir / MARKER).write_text(json.dumps({"written_by": "minitron_jax"}))
    before = listing(workdir)
    model = tiny_model()
    with pytest.raises(OutputError, match=rf"the input {workdir / 'teacher'} is inside output {workdir}"):
        save_params(model.params(), model.config, workdir, source=workdir / "teacher", overwrite=True)
    with pytest.raises(OutputError, match=r"scores\.safetensors is inside output"):
        check_output(workdir, inputs=(None, workdir / "scores.safetensors"), overwrite=True)
    assert listing(workdir) == before


def test_output_equal_to_or_inside_an_input_is_refused(tmp_path):
    model = tiny_model()
    src = save_pretrained(model, tmp_path / "model")  # a minitron output: overwrite alone would replace it
    before = listing(src)
    with pytest.raises(OutputError, match=rf"output {src} is the input {src}; choose a different --out"):
        save_pretrained(from_pretrained(src), src, overwrite=True)  # source defaults to where it was loaded from
    with pytest.raises(OutputError, match=r"is the input"):
        save_model(from_pretrained(src), src, overwrite=True)
    with pytest.raises(OutputError, match=rf"output {src / 'sub'} is inside the input {src}"):
        save_params(model.params(), model.config, src / "sub", source=src)
    link = tmp_path / "link"
    link.symlink_to(src)
    with pytest.raises(OutputError, match="is the input"):  # the same directory under another name
        check_output(link, inputs=(src,), overwrite=True)
    assert listing(src) == before and leftovers(tmp_path, "model") == []


def test_existing_output_needs_overwrite_and_files_are_never_replaced(tmp_path):
    model = tiny_model()
    out = save_model(model, tmp_path / "ckpt")
    with pytest.raises(OutputError, match=rf"output {out} exists; choose another path or pass --overwrite "
                                          r"\(overwrite=True\)"):
        save_model(model, out)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match=rf"output {f} is an existing file"):
        save_params(model.params(), model.config, f, overwrite=True)
    assert f.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    save_model(model, empty)  # an empty directory: nothing to lose
    assert is_minitron_output(empty)


# ---------------------------------------------------------------------------- replace old only once new is complete
def test_replacing_a_previous_output(tmp_path, monkeypatch):
    """A second export replaces the first (as every distillation run re-exports out/student_hf); the old
    copy is deleted only once the new one is in place."""
    a, b = tiny_model(0), tiny_model(1)
    out = save_params(a.params(), a.config, tmp_path / "student_hf")
    (out / "stale.txt").write_text("from the first export")
    marker = json.loads((out / MARKER).read_text())
    assert marker["written_by"] == "minitron_jax" and marker["kind"] == "hf" and marker["pid"] == os.getpid()

    deleted = []
    real_rmtree = atomic.shutil.rmtree

    def rmtree(p, *args, **kwargs):  # when the old copy is deleted, the new one must already be in place
        deleted.append(Path(p).name)
        assert is_minitron_output(out) and not (out / "stale.txt").exists()
        np.testing.assert_array_equal(q_proj(out), np.asarray(b.params()["layers"]["q_proj"]))
        real_rmtree(p, *args, **kwargs)
    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    save_params(b.params(), b.config, out, overwrite=True)
    assert len(deleted) == 1 and deleted[0].startswith(".student_hf.old-")
    assert not (out / "stale.txt").exists() and leftovers(tmp_path, "student_hf") == []
    monkeypatch.undo()
    ckpt = save_model(a, tmp_path / "ckpt")
    save_model(b, ckpt, overwrite=True)
    np.testing.assert_array_equal(np.asarray(load_model(ckpt).params()["layers"]["q_proj"]),
                                  np.asarray(b.params()["layers"]["q_proj"]))


def test_failure_while_writing_keeps_the_old_output(tmp_path):
    out = save_model(tiny_model(), tmp_path / "ckpt")
    before = listing(out)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert listing(out) == before and leftovers(tmp_path, "ckpt") == []


def test_failed_final_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    out = save_model(tiny_model(), tmp_path / "ckpt")
    before = listing(out)
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OutputError, match=rf"output {out}: could not move the finished output into place "
                                          r".*Input/output error.*the previous output is back in place"):
        save_model(tiny_model(1), out, overwrite=True)
    assert listing(out) == before and leftovers(tmp_path, "ckpt") == []


# ---------------------------------------------------------------------------- paths that cannot be written
def test_output_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match=rf"output {f / 'a' / 'out'} is under {f}, which is a file, not a "
                                          r"directory; choose an --out that is not under a file"):
        check_output(f / "a" / "out")
    with pytest.raises(OutputError, match="which is a file"):
        save_model(tiny_model(), f / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions, so chmod cannot make one read-only")
def test_read_only_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=rf"output {ro / 'out'}: cannot create it in {ro} \(read-only directory\)"):
            save_model(tiny_model(), ro / "out")
    finally:
        ro.chmod(0o755)


def test_read_only_parent_as_reported_by_the_os(tmp_path, monkeypatch):
    """The same check with os.access answering as it does for a non-root user (runs as root too)."""
    ro = tmp_path / "ro"
    (ro / "out").mkdir(parents=True)
    monkeypatch.setattr(atomic.os, "access", lambda p, mode: Path(p) != ro)
    with pytest.raises(OutputError, match=rf"output {ro / 'new'}: cannot create it in {ro} \(read-only directory\)"):
        check_output(ro / "new")
    with pytest.raises(OutputError, match=rf"output {ro / 'out'}: cannot replace it, its parent {ro} is a read-only"):
        check_output(ro / "out", overwrite=True)


# ---------------------------------------------------------------------------- one temporary per writer
def test_two_writers_never_share_a_temporary(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-1-deadbeef"  # a dead writer's temporary: left alone
    stale.mkdir()
    with atomic_directory(out, overwrite=True) as t1, atomic_directory(out, overwrite=True) as t2:
        assert t1 != t2 and t1.is_dir() and t2.is_dir() and stale.is_dir()
        assert t1.name.startswith(f".out.tmp-{os.getpid()}-") and t2.name.startswith(f".out.tmp-{os.getpid()}-")
        (t1 / "one").write_text("1")
        (t2 / "two").write_text("2")
    # the inner writer finishes first; the outer one (overwrite) then replaces its output, whole
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "one"]
    assert leftovers(tmp_path, "out") == [stale.name]


def test_later_writer_without_overwrite_does_not_replace_an_output_that_appeared(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=rf"output {out} exists; choose another path or pass --overwrite"):
        with atomic_directory(out) as t1:
            (t1 / "one").write_text("1")
            with atomic_directory(out) as t2:
                (t2 / "two").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "two"]
    assert leftovers(tmp_path, "out") == []


