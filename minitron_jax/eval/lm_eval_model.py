"""lm-evaluation-harness's model interface over the JAX model: `MinitronLM`, an `lm_eval` `TemplateLM` (so an
`lm_eval.api.model.LM`) whose `loglikelihood`, `loglikelihood_rolling` and `generate_until` give what lm-eval's `hf`
backend (`HFLM`) gives for the same checkpoint, with the same tokenization:

- loglikelihood: lm-eval's own pair encoding (`TemplateLM._encode_pair`: context + continuation encoded together,
  trailing spaces of the context moved to the continuation; an empty context becomes the prefix token, BOS else
  EOS), then `loglikelihood.TokenScorer` (left truncation to max_length + 1 tokens, is_greedy);
- loglikelihood_rolling: lm-eval's disjoint rolling windows of max_length tokens, summed per document;
- generate_until: requests grouped by their generation settings, contexts left-truncated to max_length -
  max_gen_toks, left-padded batches through `generate.Generator` (greedy unless do_sample; rows stop at the model's
  eos ids), a batch ends early once every row's text holds a stop string (`until`, plus the tokenizer's eos text),
  and each text is cut at the first stop string (lm-eval's `postprocess_generated_text`).

One difference is known: when the tokenizer's eos is not one of the model's eos ids, `hf` decodes past it and this
backend stops at it (the stop ids are `run.generate_job.stop_ids`, which include the tokenizer's eos).
Needs the `lmeval` extra: only `minitron lm-eval` (run/lm_eval_job.py) imports this module.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from minitron_jax.core.errors import DataError
from minitron_jax.core.progress import Progress
from minitron_jax.eval.generate import Generator
from minitron_jax.eval.loglikelihood import TokenScorer
from minitron_jax.eval.sampling import Sampling
from minitron_jax.model.config import LlamaConfig

GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}  # after normalize_gen_kwargs


class MinitronLM(TemplateLM):
    """The JAX model `params` / `cfg` with its HF `tokenizer`, for `lm_eval.simple_evaluate(model=...)`."""

    def __init__(self, params, cfg: LlamaConfig, tokenizer, *, max_length: int, stop_ids: Sequence[int] = (),
                 batch_size: int = 8, mesh=None, compute_dtype=None, attention: str = "xla", seed: int = 0,
                 info: dict[str, Any] | None = None, max_gen_toks: int = 256):
        super().__init__()
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self._max_length, self._batch_size, self.mesh = int(max_length), int(batch_size), mesh
        self.stop_ids, self.compute_dtype, self.attention, self.seed = tuple(stop_ids), compute_dtype, attention, seed
        self.info, self._max_gen_toks = dict(info or {}), int(max_gen_toks)
        self.scorer = TokenScorer(cfg, max_length=self._max_length, batch_size=self._batch_size, mesh=mesh,
                                  compute_dtype=compute_dtype, attention=attention)
        self.generators: dict[tuple[int, Sampling], Generator] = {}

    # ------------------------------------------------------------------ what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        return dict(self.info)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """`HFLM.tok_encode`: the tokenizer's own special tokens unless told, none when the text starts with BOS."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ log-likelihoods
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        progress = None if disable_tqdm else Progress(len(requests), "lm-eval loglikelihood")
        out = self.scorer(self.params, [(ctx, cont) for _, ctx, cont in requests], progress=progress)
        if progress is not None:
            progress.close()
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, counts = [], []
        for (text,) in (req.args for req in requests):
            doc = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            windows += [(None, ctx, cont) for ctx, cont in doc]
            counts.append(len(doc))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        out, k = [], 0
        for req, n in zip(requests, counts):
            total = sum(lp for lp, _ in scores[k:k + n])
            k += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # ------------------------------------------------------------------ generation
    def generator(self, max_new_tokens: int, sampling: Sampling) -> Generator:
        key = (max_new_tokens, sampling)
        if key not in self.generators:
            self.generators[key] = Generator(self.cfg, sampling, max_new_tokens=max_new_tokens, stop_ids=self.stop_ids,
                                             batch_size=self.batch_size, mesh=self.mesh, attention=self.attention,
                                             compute_dtype=self.compute_dtype, max_len=self.max_length)
        return self.generators[key]

    def settings(self, gen_kwargs: dict) -> tuple[list[str], int, Sampling]:
        """(stop strings, max_gen_toks, sampling) of a request's generation kwargs, as `HFLM.generate_until` reads them."""
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        unknown = sorted(set(kw) - GEN_KEYS)
        if unknown:
            raise DataError(f"generation_kwargs {unknown} are not supported by minitron lm-eval (it reads "
                            f"{sorted(GEN_KEYS)}); remove them from the task or --gen-kwargs")
        until = handle_stop_sequences(kw["until"], eos=self.tok_decode(self.eot_token_id, skip_special_tokens=False))
        if not kw["do_sample"]:
            return until, kw["max_gen_toks"], Sampling()
        return until, kw["max_gen_toks"], Sampling(float(kw.get("temperature") or 1.0), int(kw.get("top_k") or 0),
                                                   float(kw.get("top_p") or 1.0))

    def _stopped(self, until: list[str], tokens) -> bool:
        """Whether every row has reached a stop id or holds a stop string (a batch may end)."""
        for row in tokens.tolist():
            if any(t in self.stop_ids for t in row):
                continue
            text = self.tok_decode(row)
            if not any(s and s in text for s in until):
                return False
        return True

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, kw) in enumerate(args):
            groups.setdefault(json.dumps(kw, sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(args)
        progress = None if disable_tqdm else Progress(len(args), "lm-eval generate_until")
        for idx in groups.values():
            until, max_new, sampling = self.settings(args[idx[0]][1])
            room = self.max_length - max_new
            if room < 1:
                raise DataError(f"max_gen_toks={max_new} leaves no room for a context in max_length="
                                f"{self.max_length}; lower max_gen_toks or raise --max-length")
            prompts = {i: self.context_ids(args[i][0], room) for i in idx}
            idx = sorted(idx, key=lambda i: (-len(prompts[i]), args[i][0]))  # longest first, as HFLM
            gen = self.generator(max_new, sampling)
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start:start + self.batch_size]
                results, _ = gen(self.params, [prompts[i] for i in batch], batch, seed=self.seed,
                                 done_when=lambda toks: self._stopped(until, toks))
                for i, res in zip(batch, results):
                    out[i] = postprocess_generated_text(self.tok_decode(res.tokens), until, None)
                    self.cache_hook.add_partial("generate_until", args[i], out[i])
                if progress is not None:
                    progress.update(len(batch), tokens=sum(len(r.tokens) for r in results))
        if progress is not None:
            progress.close()
        return out

    def context_ids(self, context: str, room: int) -> list[int]:
        """A generation context's ids (`HFLM.tok_batch_encode`: no special tokens added to a text that starts with
        BOS), its last `room` tokens."""
        bos = self.tokenizer.bos_token
        ids = self.tokenizer.encode(context, **({"add_special_tokens": False} if has_bos_prefix(context, bos) else {}))
        if not ids:
            raise DataError(f"the generation context {context[:60]!r} has no tokens; give the task a doc_to_text")
        return ids[-room:]
