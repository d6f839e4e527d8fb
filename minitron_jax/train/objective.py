"""The training objective: its terms, where the teacher's side comes from, and the one loss path that the
train step and the eval step both call.

The loss is built from small terms chosen once from the recipe (`lm_term` for teacher correction; a KD term,
plus `hidden_term` when hidden_weight > 0, for distillation). The teacher's side is a `TeacherSource`, a
small strategy in the style of Tunix's distillation strategies, also chosen once from the recipe
(`teacher_source`): no teacher (fine-tuning), an online teacher forward, or the stored top-k logits of
`stored_logits.py`. It gives the teacher's outputs for a micro-batch (`teacher_outputs`) and the logit term on
them (`logit_term`); held-out batches have no stored logits, so evaluation asks `for_eval()` for its source.

`make_loss` is the one loss path: `Loss.outputs` runs the student and the teacher source on one [b, S]
micro-batch, `Loss.terms` turns the outputs into the terms. `make_objective` is the training objective; the
eval step (steps.py) calls the same `Loss` with `evaluation=True` and normaliser 1 (sums, not means).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.core.errors import TrainingError
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import forward, lm_head_weight, rms_norm
from minitron_jax.model.losses import (
    KDConfig,
    add_hidden_loss,
    hidden_cosine_loss,
    kd_loss,
    kd_loss_stored,
    lm_loss_from_hidden,
    next_token_targets,
)
from minitron_jax.prune.record import PRUNE_RECORD, load_prune_record
from minitron_jax.train.run_config import RunConfig


def kd_config(rc: RunConfig) -> KDConfig:
    return KDConfig(temperature=rc.temperature, kl_weight=rc.kl_weight, ce_weight=rc.ce_weight, top_k=rc.top_k,
                    chunk_size=rc.chunk_size, hidden_weight=rc.hidden_weight)


def uses_hidden(rc: RunConfig) -> bool:
    """The recipe trains with the hidden-state loss (and its learned projection)."""
    return rc.hidden_weight > 0 and rc.mode == "distill"


# ---------------------------------------------------------------------------- the hidden-state pairing
def layer_map(student_layers: int, teacher_layers: int) -> np.ndarray:
    """Teacher layer matched to each student layer when the pruning is not recorded (proportional depth)."""
    return np.asarray([round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)])


def hidden_init(student_dir, s_cfg: LlamaConfig, t_cfg: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """(teacher layer of each student layer [Ls], initial projection [Hs, Ht]) for the hidden-state loss.

    From the student's `minitron_prune.json` (written at prune time) when it has one: the teacher layer
    each student layer was cut from, and the selection of the kept hidden channels (proj[i, kept[i]] = 1,
    so the projected student state starts as the teacher's state on those channels). Without a record:
    proportional depth and eye(Hs, Ht)."""
    rec = load_prune_record(student_dir)
    if rec is None:
        return layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers), np.eye(s_cfg.hidden_size, t_cfg.hidden_size,
                                                                                    dtype=np.float32)
    layers, kept, src = np.asarray(rec["layers"], np.int64), np.asarray(rec["hidden"], np.int64), rec["source_config"]
    fix = (f"; distil from the teacher it was pruned from ({rec.get('source')}), or delete "
           f"{Path(student_dir) / PRUNE_RECORD} to pair layers by depth")
    if (src.get("num_hidden_layers"), src.get("hidden_size")) != (t_cfg.num_hidden_layers, t_cfg.hidden_size):
        raise TrainingError(f"the student was pruned from a model with {src.get('num_hidden_layers')} layers and hidden "
                            f"size {src.get('hidden_size')}, but the teacher has {t_cfg.num_hidden_layers} and "
                            f"{t_cfg.hidden_size}" + fix)
    if len(layers) != s_cfg.num_hidden_layers or len(kept) != s_cfg.hidden_size:
        raise TrainingError(f"{PRUNE_RECORD} lists {len(layers)} layers and {len(kept)} hidden channels, but the "
                            f"student has {s_cfg.num_hidden_layers} and {s_cfg.hidden_size}" + fix)
    if not (0 <= layers.min() and layers.max() < t_cfg.num_hidden_layers and 0 <= kept.min()
            and kept.max() < t_cfg.hidden_size):
        raise TrainingError(f"{PRUNE_RECORD} holds indices outside the teacher's layers or hidden channels" + fix)
    proj = np.zeros((s_cfg.hidden_size, t_cfg.hidden_size), np.float32)
    proj[np.arange(len(kept)), kept] = 1.0
    return layers, proj


def batch_targets(mb: dict):
    """(next-token targets, mask of the positions trained on) of a [b, S] micro-batch: real targets in the same
    document (`next_token_targets`), and, when the rows carry a loss mask (SFT), only those whose target token
    is marked (loss_mask[t + 1])."""
    targets, tmask = next_token_targets(mb["input_ids"], mb["mask"], mb["segment_ids"])
    if "loss_mask" in mb:
        lm = mb["loss_mask"].astype(tmask.dtype)
        tmask = tmask * jnp.concatenate([lm[:, 1:], jnp.zeros_like(lm[:, :1])], axis=1)
    return targets, tmask


# ---------------------------------------------------------------------------- objective terms
# Each objective term is a small function of one micro-batch's forward outputs `o` and `n`, the whole
# step's real-target count: it returns (value, logged metrics), sums over the micro-batch divided by n,
# so that micro-batch values add up to the step's token means whatever the packing or process count.
def lm_term(o: dict, kd: KDConfig, n):
    """Next-token cross-entropy of the student (teacher correction)."""
    ce = lm_loss_from_hidden(o["h_s"], o["head_s"], o["targets"], o["tmask"], kd.chunk_size, normalizer=n)
    return ce, {"ce": ce}


def kd_term(o: dict, kd: KDConfig, n):
    """kl_weight x KL(teacher || student) + ce_weight x CE on the logits of an online teacher."""
    loss, m = kd_loss(o["h_s"], o["h_t"], o["head_s"], o["head_t"], o["targets"], o["tmask"], kd, normalizer=n)
    return loss, {"kl": m["kl"], "ce": m["ce"]}


def stored_kd_term(o: dict, kd: KDConfig, n):
    """`kd_term` against the teacher's stored top-k logits."""
    loss, m = kd_loss_stored(o["h_s"], o["head_s"], o["t_values"], o["t_indices"], o["targets"], o["tmask"], kd,
                             normalizer=n)
    return loss, {"kl": m["kl"], "ce": m["ce"]}


def hidden_term(o: dict, kd: KDConfig, n):
    """1 - cosine between each student layer's output (after the final norm, projected by the learned
    `proj`) and the output of its teacher layer, mean over layers and tokens."""
    h = hidden_cosine_loss(o["states_s"], o["states_t"], o["proj"], o["tmask"], normalizer=n)
    return h, {"hidden_loss": h}


def combine(parts: dict, kd: KDConfig):
    """The step's loss from its summed terms: logit + hidden_weight x dynamic weight x hidden, where the
    dynamic weight (logit / hidden, no gradient) is taken from the whole step's sums."""
    return add_hidden_loss(parts["logit"], parts["hidden"], kd) if "hidden" in parts else parts["logit"]


# ---------------------------------------------------------------------------- where the teacher comes from
Forward = Callable[[Any, LlamaConfig, dict, Any], tuple[Any, Any]]  # (params, cfg, mb, dtype) -> (hidden, layers)


class TeacherSource:
    """Strategy: the teacher's side of the logit loss. `teacher_outputs(teacher, mb, run)` adds the teacher's
    outputs for micro-batch `mb` to the forward outputs (`run` is the model forward the loss uses);
    `logit_term(o, kd, n)` is the term on them; `for_eval()` is the source held-out batches use."""
    loads_teacher = False  # the teacher's weights are loaded and passed to the steps

    def teacher_outputs(self, teacher, mb: dict, run: Forward) -> dict:
        return {}

    def logit_term(self, o: dict, kd: KDConfig, n):
        raise NotImplementedError

    def for_eval(self) -> TeacherSource:
        return self


class NoTeacher(TeacherSource):
    """Fine-tuning (teacher correction): the student's own next-token loss."""

    def logit_term(self, o, kd, n):
        return lm_term(o, kd, n)


@dataclasses.dataclass(frozen=True)
class OnlineTeacher(TeacherSource):
    """The teacher's forward in the step (no gradient), at `dtype`."""
    cfg: LlamaConfig
    dtype: Any
    loads_teacher = True

    def teacher_outputs(self, teacher, mb, run):
        teacher = jax.lax.stop_gradient(teacher)
        h_t, states_t = run(teacher, self.cfg, mb, self.dtype)
        return {"h_t": h_t, "head_t": lm_head_weight(teacher, self.cfg), "layers_t": states_t}

    def logit_term(self, o, kd, n):
        return kd_term(o, kd, n)


class StoredTeacher(TeacherSource):
    """The teacher's top-k logits written by `minitron teacher-logits`, carried by the batch (`t_values`,
    `t_indices`): no teacher forward and no teacher parameters. Held-out batches have none: evaluation
    reports the student's CE only."""

    def teacher_outputs(self, teacher, mb, run):
        return {"t_values": mb["t_values"], "t_indices": mb["t_indices"]}

    def logit_term(self, o, kd, n):
        return stored_kd_term(o, kd, n)

    def for_eval(self):
        return NoTeacher()


def teacher_source(rc: RunConfig, t_cfg: LlamaConfig | None) -> TeacherSource:
    """The recipe's teacher source: none (finetune), stored logits (teacher_logits=), else an online teacher."""
    if not rc.has_teacher:
        return NoTeacher()
    if rc.teacher_logits is not None:
        return StoredTeacher()
    return OnlineTeacher(t_cfg, rc.teacher_compute_dtype())


# ---------------------------------------------------------------------------- the one loss path
@dataclasses.dataclass(frozen=True)
class Loss:
    """`outputs(trainable, teacher, mb)` -> the forward outputs `o` of one [b, S] micro-batch (student, teacher
    source, next-token targets and mask); `terms(o, n)` -> ({"logit": ., ["hidden": .]}, metrics), sums over
    the micro-batch divided by n. Calling it is the training objective."""
    outputs: Callable[[dict, Any, dict], dict]
    terms: Callable[[dict, Any], tuple[dict, dict]]

    def __call__(self, trainable, teacher, mb, n):
        return self.terms(self.outputs(trainable, teacher, mb), n)


def make_loss(rc: RunConfig, s_cfg: LlamaConfig, t_cfg: LlamaConfig | None, kd: KDConfig, teacher_layers=None,
              evaluation: bool = False) -> Loss:
    """The loss of the recipe, its terms and teacher source chosen once here (LM for finetune; KD, plus the
    hidden term when hidden_weight > 0, for distill). `evaluation`: the held-out loss (the eval source, no
    hidden term, no rematerialisation)."""
    source = teacher_source(rc, t_cfg)
    source = source.for_eval() if evaluation else source
    hidden = uses_hidden(rc) and not evaluation
    terms = {"logit": source.logit_term}
    if hidden:
        terms["hidden"] = hidden_term
        tmap = jnp.asarray(layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
                           if teacher_layers is None else teacher_layers)
    grab = (lambda acts, m: acts["layer_out"]) if hidden else None  # noqa: E731
    remat = "none" if evaluation else rc.remat

    def run(params, cfg, mb, dtype):
        out = forward(params, cfg, mb["input_ids"], attention_mask=mb["mask"], segment_ids=mb["segment_ids"],
                      remat=remat, return_hidden=True, compute_dtype=dtype, capture=grab, attention=rc.attention)
        if not hidden:
            return out, None
        h, states = out  # layer outputs [L, B, S, H], compared after the model's final norm
        return h, jax.vmap(lambda x: rms_norm(x, params["norm"], cfg.rms_norm_eps))(states)

    def outputs(trainable, teacher, mb):
        student = trainable["model"]
        targets, tmask = batch_targets(mb)
        o = {"targets": targets, "tmask": tmask, "head_s": lm_head_weight(student, s_cfg)}
        o["h_s"], o["states_s"] = run(student, s_cfg, mb, rc.compute_dtype)
        o.update(source.teacher_outputs(teacher, mb, run))
        states_t = o.pop("layers_t", None)
        if hidden:
            o["states_t"], o["proj"] = states_t[tmap], trainable["proj"]
        return o

    def loss_terms(o, n):
        parts, metrics = {}, {}
        for name, term in terms.items():
            parts[name], m = term(o, kd, n)
            metrics.update(m)
        return parts, metrics

    return Loss(outputs, loss_terms)


def make_objective(rc: RunConfig, s_cfg: LlamaConfig, t_cfg: LlamaConfig | None, kd: KDConfig,
                   teacher_layers=None) -> Loss:
    """objective(trainable, teacher, mb, n) -> ({"logit": ., ["hidden": .]}, metrics) for one [b, S]
    micro-batch: the recipe's training loss (`make_loss`)."""
    return make_loss(rc, s_cfg, t_cfg, kd, teacher_layers)
