"""Pipeline stages: callable classes that load a model once per actor and process a batch per call.

A stage is data: `StageSpec(cls, name, pool, kwargs)`. A pipeline is a list of specs over a source
(documents, or stored rows), so AR-only over edited explanations, the AV of one family into the AR of
another, or several layers into one pair are different lists, not different pipelines. The base class
stamps `<name>_t0`, `<name>_t1`, `<name>_worker` and `<name>_tinit` (when the actor was placed) on
every row, from which the timeline shows whether the pools were placed and ran side by side.

Column conventions: an extraction writes `vector`, `position`, `layer`, ... (with `prefix` for a second
family: `b_vector`, `b_position`); an AV stage reads `<src>vector` and writes `<out>explanation`,
`<out>av_text`, `<out>status`, `<out>n_gen_tokens`; an AR stage reads a text column and a gold vector
column and writes `recon<suffix>`, `nmse<suffix>`, `cos<suffix>`. Rows whose position is negative (a
short document's marker, an unaligned position) pass through unscored.

A row a stage cannot process does not stop the run. Every stage's output carries `row_error` ("" when
the row is fine). When `process` raises on a batch, the batch is retried row by row; a row that still
raises comes out with `row_error` = "<stage>: <exception>" (an extraction's document as marker rows of
position -3), and later stages pass it through untouched. Stages also refuse rows on their own
(a non-finite or all-zero vector, text that is not valid Unicode). The driver keeps such rows apart
from the finished ones, records and counts them (nla_ray.runtime.pipeline).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nla_ray.config import PoolConfig

SHORT = "short_doc"
UNALIGNED = -2
FAILED = -3          # position of the marker rows of a document extraction could not process
ERROR = "row_error"  # "" when the row is fine, else why a stage could not process it
# Fault injection for reliability checks (jobs/reliability.py): "<stage name>:<doc id>[,<doc id>...]"
# makes that stage raise on any batch holding those documents. Unset, it does nothing.
FAULT_ENV = "NLA_RAY_FAULT_ROWS"


class InjectedFault(RuntimeError):
    """Raised by a stage on the documents NLA_RAY_FAULT_ROWS names."""


def _fault_docs(stage: str) -> set[str]:
    spec = os.environ.get(FAULT_ENV, "")
    name, _, docs = spec.partition(":")
    return {d for d in docs.split(",") if d} if spec and name == stage else set()


# What an extraction row holds; the activation store keeps exactly these.
EXTRACT_COLUMNS = ["doc_id", "position", "n_raw_tokens", "sample_rank", "positions_in_doc", "layer", "model_id",
                   "token_id", "token", "char_start", "char_end", "prefix_text", "vector", "seed",
                   "anchor_position", "align_err", "sample_idx", "extract_t0", "extract_t1", "extract_worker"]


def worker_label() -> str:
    try:
        import ray

        # outside Ray (stages called directly) get_gpu_ids would start a local Ray instance
        gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:  # not inside Ray (unit tests call stages directly)
        gpus = []
    return f"{socket.gethostname()}:{os.getpid()}" + (f":gpu{','.join(str(g) for g in gpus)}" if gpus else "")


@dataclass
class StageSpec:
    """One pool of the pipeline: which class, its name (column prefix of its stamps), its resources."""

    cls: type
    name: str
    pool: PoolConfig
    kwargs: dict = field(default_factory=dict)

    def map_batches_args(self) -> dict:
        import ray.data as rd

        kw = dict(fn_constructor_kwargs={"name": self.name, "num_cpus": self.pool.num_cpus, **self.kwargs},
                  batch_size=self.pool.batch_size, num_cpus=self.pool.num_cpus, batch_format="numpy",
                  compute=rd.ActorPoolStrategy(size=max(1, self.pool.concurrency)))
        if self.pool.num_gpus:
            kw["num_gpus"] = self.pool.num_gpus
        return kw

    def describe(self) -> dict:
        return {"stage": self.cls.__name__, "name": self.name, "num_gpus": self.pool.num_gpus,
                "num_cpus": self.pool.num_cpus, "concurrency": self.pool.concurrency,
                "batch_size": self.pool.batch_size, "dtype": self.pool.dtype}


class Stage:
    """Load in `__init__`, one batch in `process`; `__call__` adds the timing stamps."""

    def __init__(self, name: str, num_cpus: float = 1.0):
        # When Ray placed this actor (its construction starts once its resources are granted): the
        # `<name>_tinit` stamp, from which the timeline shows whether every pool was placed at once.
        self._t_init = time.time()
        import torch

        self.name = name
        torch.set_num_threads(max(1, int(num_cpus)))
        self._faults = _fault_docs(name)

    def _process(self, batch: dict) -> dict:
        if self._faults:
            hit = sorted(self._faults & {str(d) for d in batch["doc_id"]})
            if hit:
                raise InjectedFault(f"injected fault ({FAULT_ENV}) on document(s) {hit}")
        return self.process(batch)

    def process(self, batch: dict) -> dict:
        raise NotImplementedError

    def failed_rows(self, rows: dict, message: str) -> dict:
        """Output rows standing for input `rows` this stage could not process: by default the rows
        marked with `row_error`, which `process` passes through untouched."""
        return self.process({**rows, ERROR: np.array([message] * len(rows["doc_id"]), dtype=object)})

    def __call__(self, batch: dict) -> dict:
        t0 = time.time()
        try:
            out = _with_error(self._process(batch))
        except Exception as e:  # noqa: BLE001 - isolated row by row below; re-raised if that cannot be done
            out = self._isolate(batch, e)
        n = len(out["doc_id"])
        out[f"{self.name}_t0"] = np.full(n, t0)
        out[f"{self.name}_t1"] = np.full(n, time.time())
        out[f"{self.name}_worker"] = np.array([worker_label()] * n, dtype=object)
        out[f"{self.name}_tinit"] = np.full(n, self._t_init)
        return out

    def _isolate(self, batch: dict, first: Exception) -> dict:
        """`process` raised on `batch`: run its rows one at a time; rows that raise alone become
        failed rows naming the error. Re-raises `first` when no failed row can be formed."""
        n = len(batch["doc_id"])
        pieces = []
        for i in range(n):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            try:
                pieces.append(_with_error(self._process(one)))
            except Exception as e:  # noqa: BLE001
                msg = f"{self.name}: {type(e).__name__}: {e}"[:2000]
                try:
                    pieces.append(_with_error(self.failed_rows(one, msg)))
                except Exception:  # noqa: BLE001 - this stage cannot pass a row through: fail as before
                    raise first from None
        keys = set(pieces[0])
        if any(set(p) != keys for p in pieces):
            raise first
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


def _with_error(out: dict) -> dict:
    if ERROR not in out:
        out[ERROR] = np.array([""] * len(out["doc_id"]), dtype=object)
    return out


def row_ok(batch: dict) -> np.ndarray:
    """Rows no earlier stage has failed."""
    err = batch.get(ERROR)
    n = len(batch["doc_id"])
    if err is None:
        return np.ones(n, dtype=bool)
    return np.array([not (isinstance(e, str) and e) for e in err], dtype=bool)


def vector_problem(v: np.ndarray) -> str:
    """Why a gold/injected vector cannot be used ("" when it can): NaN/Inf values, or no direction."""
    v = np.asarray(v)
    bad = int(np.size(v) - np.count_nonzero(np.isfinite(v)))
    if bad:
        return f"{bad} non-finite value(s) (NaN/Inf) in the vector"
    if not np.any(v):
        return "the vector is all zeros (it has no direction to explain or score)"
    return ""


def text_problem(text) -> str:
    """Why a document's text cannot be tokenized faithfully ("" when it can)."""
    if not isinstance(text, str):
        return f"text is {type(text).__name__}, not str"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"text is not valid Unicode: {e.reason} at character {e.start} "
                f"({text[e.start:e.end]!r}; bytes decoded with surrogateescape?)")
    return ""


def _columns(rows: list[dict]) -> dict:
    out = {k: np.array([r[k] for r in rows], dtype=object if isinstance(rows[0][k], str) else None)
           for k in rows[0] if k != "vector"}
    out["vector"] = np.stack([r["vector"] for r in rows]).astype(np.float32)
    out["sample_idx"] = np.zeros(len(rows), dtype=np.int64)  # one row per activation until an AV samples
    return out


class Extract(Stage):
    """documents (doc_id, text[, anchors]) -> one row per (sampled position x layer): the raw vector.

    Without anchors, positions follow the release's stage-0 rule. With an `anchors` column (JSON list
    of another tokenizer's [position, char_end] per document), each anchor is mapped to this
    tokenizer's token ending at or nearest that character; anchors off by more than `align_tolerance`
    characters become rows with position -2 (dropped downstream, counted), never misaligned rows.
    """

    def __init__(self, name: str, num_cpus: float, *, base: str, layers: list[int], seed: int,
                 positions_per_doc: int, max_length: int, dtype: str = "auto", align_tolerance: int = 2,
                 adapter: str | None = None, positions: str = "sample", max_position: int | None = None,
                 stride: int = 1):
        """`adapter`: a pair role directory (av/ or ar/) whose LoRA adapter is merged into the base
        first, to read that fine-tuned model's own residual stream (self-drift, §7c). `positions`:
        "sample" (stage 0) or "every" (every non-special position up to `max_position`, all of the
        first 16 then every `stride`-th: token-position traces; see nla_ray.nla.extract.every_position)."""
        super().__init__(name, num_cpus)
        from transformers import AutoTokenizer

        from nla_ray.nla import sources
        from nla_ray.nla.extract import Extractor
        from nla_ray.nla.models import load_backbone, remote_code_allowed, resolve_device, resolve_dtype, text_config

        dev = resolve_device("auto")
        res = sources.resolve(base)
        tok = AutoTokenizer.from_pretrained(res.path, trust_remote_code=remote_code_allowed())
        if adapter:
            from nla_ray.nla.models import backbone_from_model, load_causal_lm
            from nla_ray.nla.pairs import apply_adapter

            # The adapter targets every block, so the whole model is loaded, merged, then viewed up to K.
            # A role directory holding full weights (no adapter/) is that model itself.
            own = Path(adapter) if (Path(adapter) / "config.json").is_file() else Path(res.path)
            full = apply_adapter(load_causal_lm(str(own), device=dev, dtype=resolve_dtype(dtype, dev)), adapter)
            model = backbone_from_model(full, max(layers) + 1).eval()
        else:
            # Only the blocks up to the deepest layer asked for are loaded and run (no full-depth load).
            model = load_backbone(res.path, max(layers) + 1, device=dev, dtype=resolve_dtype(dtype, dev))
        self.d = text_config(model.config).hidden_size
        self.layers = sorted(set(int(x) for x in layers))
        self.base, self.seed, self.tol = base, seed, align_tolerance
        self.ex = Extractor(model, tok, self.layers, model_id=base, seed=seed,
                            positions_per_doc=positions_per_doc, max_length=max_length, rule=positions,
                            max_position=max_position, stride=stride)

    def _marker(self, doc_id: str, position: int, layer: int, **extra) -> dict:
        row = {"doc_id": doc_id, "position": position, "n_raw_tokens": 0, "sample_rank": 0,
               "positions_in_doc": 0, "layer": layer, "model_id": self.base, "token_id": -1, "token": "",
               "char_start": -1, "char_end": -1, "prefix_text": "", "vector": np.zeros(self.d, np.float32),
               "seed": self.seed, "anchor_position": -1, "align_err": 0}
        row.update(extra)
        return row

    def failed_rows(self, rows: dict, message: str) -> dict:
        out = [self._marker(d, FAILED, L) for d in rows["doc_id"].tolist() for L in self.layers]
        cols = _columns(out)
        cols[ERROR] = np.array([message] * len(out), dtype=object)
        return cols

    def process(self, batch: dict) -> dict:
        bad = [text_problem(t) for t in batch["text"].tolist()]
        if any(bad):  # such a document fails on its own; the others go on
            keep = np.array([not b for b in bad])
            parts = [self.failed_rows({"doc_id": batch["doc_id"][i:i + 1]}, f"{self.name}: doc {batch['doc_id'][i]}: {b}")
                     for i, b in enumerate(bad) if b]
            if keep.any():
                parts.insert(0, _with_error(self.process({k: v[keep] for k, v in batch.items()})))
            parts = [_with_error(p) for p in parts]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        ids = batch["doc_id"].tolist()
        texts = batch["text"].tolist()
        rows: list[dict] = []
        if "anchors" in batch:
            for doc_id, text, anchors in zip(ids, texts, batch["anchors"].tolist()):
                rows.extend(self._aligned(doc_id, text, json.loads(anchors)))
        else:
            rows = self.ex.extract(list(zip(ids, texts)))
            for r in rows:
                r.update(anchor_position=-1, align_err=0)
            seen = {r["doc_id"] for r in rows}
            for doc_id in ids:
                if doc_id not in seen:  # too short: a marker row tells resume the document is done
                    rows.extend(self._marker(doc_id, -1, L, status=SHORT) for L in self.layers)
            for r in rows:
                r.pop("status", None)
        out = _columns(rows)
        err = np.array([""] * len(rows), dtype=object)
        for i in np.nonzero(out["position"] >= 0)[0]:
            why = vector_problem(out["vector"][i])
            if why:  # e.g. a bf16 overflow: never stored, never explained
                err[i] = f"{self.name}: doc {out['doc_id'][i]} position {out['position'][i]} layer {out['layer'][i]}: {why}"
        out[ERROR] = err
        return out

    def _aligned(self, doc_id: str, text: str, anchors: list) -> list[dict]:
        from nla_ray.nla.extract import align_position

        if not anchors:
            return [self._marker(doc_id, -1, L) for L in self.layers]
        tok_ids, offs = self.ex.tokenize(text)
        special = self.ex.special
        usable = [(s, e) if t not in special else (0, 0) for t, (s, e) in zip(tok_ids, offs)]
        hs = self.ex.hidden([tok_ids])[0]
        rows = []
        for rank, (a_pos, a_end) in enumerate(anchors):
            try:
                p, err = align_position(int(a_end), usable)
            except ValueError:
                p, err = -1, 10 ** 6
            if p < 0 or abs(err) > self.tol:
                rows.extend(self._marker(doc_id, UNALIGNED, L, sample_rank=rank, positions_in_doc=len(anchors),
                                         anchor_position=int(a_pos), align_err=int(err)) for L in self.layers)
                continue
            cs, ce = offs[p]
            prefix = self.ex.tok.decode(tok_ids[: p + 1], skip_special_tokens=True)
            for L in self.layers:
                rows.append({"doc_id": doc_id, "position": p, "n_raw_tokens": p + 1, "sample_rank": rank,
                             "positions_in_doc": len(anchors), "layer": L, "model_id": self.base,
                             "token_id": int(tok_ids[p]), "token": self.ex.tok.decode([tok_ids[p]]),
                             "char_start": int(cs), "char_end": int(ce), "prefix_text": prefix,
                             "vector": hs[L][p].cpu().numpy().astype(np.float32), "seed": self.seed,
                             "anchor_position": int(a_pos), "align_err": int(err)})
        return rows


def _stop_ids(model, tok) -> list[int]:
    """End-of-turn ids of a chat model: its generation config's eos, the tokenizer's, and the
    usual turn-end tokens the vocabulary has."""
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        ids.update([e] if isinstance(e, int) else list(e or []))
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
        tid = tok.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid >= 0 and tid != getattr(tok, "unk_token_id", None):
            ids.add(tid)
    return sorted(int(i) for i in ids)


class ChatAnswer(Stage):
    """prompts (doc_id, text = one user turn) -> the base model's greedy answer, and its raw layer
    vectors at the last prompt token and at `offsets` tokens before it (decoding before an answer).

    The user turn goes through the tokenizer's chat template with the generation prompt, tokenized in
    one step (as the AV prompt is); offset 0 is the last token before the answer (the template's
    newline after the assistant marker). One row per (offset x layer), with `offset`, `answer` (the
    greedy continuation up to the first end-of-turn token, special tokens dropped), `answer_tokens`
    and `prompt_tokens`; `prefix_text` keeps the template's special tokens.
    """

    def __init__(self, name: str, num_cpus: float, *, base: str, layers: list[int], offsets: list[int],
                 max_new_tokens: int = 64, seed: int = 42, dtype: str = "auto"):
        super().__init__(name, num_cpus)
        from transformers import AutoTokenizer

        from nla_ray.nla import sources
        from nla_ray.nla.extract import Extractor
        from nla_ray.nla.models import load_causal_lm, remote_code_allowed, resolve_device, resolve_dtype, text_config

        dev = resolve_device("auto")
        res = sources.resolve(base)
        self.tok = AutoTokenizer.from_pretrained(res.path, trust_remote_code=remote_code_allowed())
        if not getattr(self.tok, "chat_template", None):
            raise ValueError(f"{base}: the tokenizer has no chat template to put the prompt in a user turn")
        self.model = load_causal_lm(res.path, device=dev, dtype=resolve_dtype(dtype, dev))
        self.d = text_config(self.model.config).hidden_size
        self.layers = sorted(set(int(x) for x in layers))
        self.offsets = [int(o) for o in offsets]
        self.base, self.seed, self.max_new = base, seed, int(max_new_tokens)
        # a truncated, identity-normed view of the same weights: block-K outputs as Extract reads them
        self.ex = Extractor(self.model, self.tok, self.layers, model_id=base, seed=seed)
        self.stop = _stop_ids(self.model, self.tok)

    def prompt_ids(self, text: str) -> list[int]:
        from nla_ray.nla.templates import _as_id_list

        out = self.tok.apply_chat_template([{"role": "user", "content": str(text)}], tokenize=True,
                                           add_generation_prompt=True)
        return _as_id_list(out)

    def answer(self, ids: list[int]) -> tuple[str, int]:
        import torch

        x = torch.tensor([ids], device=self.ex.device)
        with torch.no_grad():
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                      max_new_tokens=self.max_new, eos_token_id=self.stop, pad_token_id=self.stop[0],
                                      temperature=None, top_p=None, top_k=None)
        new = out[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(new) if t in self.stop), len(new))
        return self.tok.decode(new[:cut], skip_special_tokens=True).strip(), cut

    def process(self, batch: dict) -> dict:
        rows: list[dict] = []
        for doc_id, text in zip(batch["doc_id"].tolist(), batch["text"].tolist()):
            ids = self.prompt_ids(text)
            hs = self.ex.hidden([ids])[0]
            answer, n_ans = self.answer(ids)
            valid = [o for o in self.offsets if len(ids) - 1 - o >= 0]
            for rank, o in enumerate(valid):
                p = len(ids) - 1 - o
                for L in self.layers:
                    rows.append({"doc_id": doc_id, "position": p, "n_raw_tokens": p + 1, "sample_rank": rank,
                                 "positions_in_doc": len(valid), "layer": L, "model_id": self.base,
                                 "token_id": int(ids[p]), "token": self.tok.decode([ids[p]]), "char_start": -1,
                                 "char_end": -1, "prefix_text": self.tok.decode(ids[: p + 1]),
                                 "vector": hs[L][p].cpu().numpy().astype(np.float32), "seed": self.seed,
                                 "anchor_position": -1, "align_err": 0, "offset": o, "answer": answer,
                                 "answer_tokens": int(n_ans), "prompt_tokens": len(ids)})
        return _columns(rows)


class Verbalize(Stage):
    """gold vectors -> `n_samples` explanations each (AV; per-sample seeds, optional banned tokens).

    Reads `<src>vector` / `<src>position`; writes `<out>explanation`, `<out>av_text`, `<out>status`,
    `<out>n_gen_tokens`. With n_samples > 1 each row is repeated once per sample (`sample_idx`).
    """

    def __init__(self, name: str, num_cpus: float, *, av_dir: str, dtype: str = "auto", seed: int = 42,
                 temperature: float = 0.0, n_samples: int = 1, max_new_tokens: int = 150,
                 banned_chars: list | None = None, backend: str = "loop", src: str = "", out: str = "",
                 decode_batch=None, attn: str = "auto", batch_size: int | None = None):
        super().__init__(name, num_cpus)
        from nla_ray.nla import pairs
        from nla_ray.nla.av import GRAPH_BACKENDS

        self.av = pairs.load_av(av_dir, dtype=dtype, max_new_tokens=max_new_tokens, backend=backend,
                                decode_batch=decode_batch, attn=attn)
        if decode_batch is None and backend in GRAPH_BACKENDS and batch_size and self.av.device.type == "cuda":
            # One decode shape for the whole run: every call (the pool's batch x its samples) and the
            # last, short one padded up to it share one captured session (see AVEngine.warm_up). Only
            # on a GPU: a CPU captures no graphs, and padding would only add work.
            self.av.decode_batch = int(batch_size) * max(1, n_samples)
        self.banned = self.av.banned_ids_for(banned_chars) if banned_chars else None
        self.warmup_s = self.av.warm_up(temperature=temperature, banned_ids=self.banned)
        if self.warmup_s:
            print(f"[{name}] warmed up: a {self.av.decode_batch}-row decode (compile, graph capture) in "
                  f"{self.warmup_s:.1f} s before the first batch", flush=True)
        self.seed, self.temperature, self.n_samples = seed, temperature, max(1, n_samples)
        self.src, self.out = src, out

    def process(self, batch: dict) -> dict:
        from nla_ray.core.noise import sample_seed

        n_in = len(batch["doc_id"])
        if self.n_samples > 1:
            idx = np.repeat(np.arange(n_in), self.n_samples)
            out = {k: v[idx] for k, v in batch.items()}
            out["sample_idx"] = np.tile(np.arange(self.n_samples), n_in)
        else:
            out = dict(batch)
            out.setdefault("sample_idx", np.zeros(n_in, dtype=np.int64))
        n = len(out["doc_id"])
        pos, vec = out[f"{self.src}position"], out[f"{self.src}vector"]
        # "" rather than None: Ray turns None in object columns into NaN between stages.
        expl, raw = np.array([""] * n, dtype=object), np.array([""] * n, dtype=object)
        status, ntok = np.array([SHORT] * n, dtype=object), np.zeros(n, dtype=np.int64)
        ok = row_ok(out)
        err = np.array(out[ERROR] if ERROR in out else [""] * n, dtype=object)
        for i in np.nonzero(ok & (pos >= 0))[0]:
            why = vector_problem(vec[i])
            if why:
                err[i], ok[i] = (f"{self.name}: doc {out['doc_id'][i]} position {pos[i]} layer "
                                 f"{out[f'{self.src}layer'][i]}: {why}"), False
        out[ERROR] = err
        vi = np.nonzero(ok & (pos >= 0))[0]
        if len(vi):
            seeds = [sample_seed(self.seed, out["doc_id"][i], int(pos[i]), int(out[f"{self.src}layer"][i]),
                                 int(out["sample_idx"][i])) for i in vi]
            samples = self.av.generate(vec[vi], temperature=self.temperature, seeds=seeds, banned_ids=self.banned)
            for i, s in zip(vi, samples):
                expl[i], raw[i], status[i], ntok[i] = s.explanation or "", s.text, s.status, s.n_tokens
        o = self.out
        out.update({f"{o}explanation": expl, f"{o}av_text": raw, f"{o}status": status, f"{o}n_gen_tokens": ntok})
        return out


def ar_input_texts(explanations, statuses, raw_texts) -> list[str]:
    """What the AR reads: the explanation, or for a decode with no opening tag the raw text (a tag
    failure is scored on whatever the AV produced; `status` keeps it separable)."""
    return [str(r) if s == "no_open_tag" else str(e) for e, s, r in zip(explanations, statuses, raw_texts)]


class Reconstruct(Stage):
    """explanations -> reconstructions and per-row NMSE/cos against a gold vector column (AR).

    `reads` lists what this AR reads, as (text column, gold column, position column, suffix): one pool
    can score several texts (e.g. both families' explanations in cross-family transfer) with one copy
    of the model. Each read writes `recon<suffix>`, `nmse<suffix>`, `cos<suffix>`.
    """

    def __init__(self, name: str, num_cpus: float, *, ar_dir: str, dtype: str = "auto", batch_size: int = 16,
                 reads: list | None = None):
        super().__init__(name, num_cpus)
        from nla_ray.nla import pairs

        self.ar = pairs.load_ar(ar_dir, dtype=dtype)
        self.bs = max(1, batch_size)
        self.reads = [tuple(r) for r in (reads or [("explanation", "vector", "position", "")])]

    def process(self, batch: dict) -> dict:
        from nla_ray.core import metrics

        out = dict(batch)
        n = len(batch["doc_id"])
        ok = row_ok(batch)
        err = np.array(batch[ERROR] if ERROR in batch else [""] * n, dtype=object)
        for _, gold_col, position, _ in self.reads:
            for i in np.nonzero(ok & (batch[position] >= 0))[0]:
                why = vector_problem(batch[gold_col][i])
                if why:
                    err[i], ok[i] = (f"{self.name}: doc {batch['doc_id'][i]} position {batch[position][i]}: "
                                     f"gold column {gold_col!r}: {why}"), False
        out[ERROR] = err
        for text, gold_col, position, suffix in self.reads:
            gold = batch[gold_col]
            recon = np.zeros_like(gold, dtype=np.float32)
            nm, cs = np.full(n, np.nan, dtype=np.float32), np.full(n, np.nan, dtype=np.float32)
            cut = np.zeros(n, dtype=bool)
            vi = np.nonzero(ok & (batch[position] >= 0))[0]
            if len(vi):
                texts = batch[text][vi]
                # the text column's AV outputs sit beside it: '<p>explanation' -> '<p>status', '<p>av_text'
                p = text[: -len("explanation")] if text.endswith("explanation") else None
                if p is not None and f"{p}status" in batch:
                    texts = ar_input_texts(texts, batch[f"{p}status"][vi], batch[f"{p}av_text"][vi])
                r = self.ar.reconstruct([str(t) for t in texts], batch_size=self.bs)
                cut[vi] = self.ar.last_truncated
                recon[vi] = r
                nm[vi] = metrics.nmse(r, gold[vi], self.ar.meta.mse_scale)
                cs[vi] = metrics.cosine(r, gold[vi])
            # ar_truncated: the text was longer than the AR's context and scored on its cut form
            out.update({f"recon{suffix}": recon, f"nmse{suffix}": nm, f"cos{suffix}": cs,
                        f"ar_truncated{suffix}": cut})
        return out


class Apply(Stage):
    """A CPU function over the batch (e.g. editing explanations before an AR reads them)."""

    def __init__(self, name: str, num_cpus: float, *, fn: Callable[[dict], dict], **fn_kwargs: Any):
        super().__init__(name, num_cpus)
        self.fn, self.fn_kwargs = fn, fn_kwargs

    def process(self, batch: dict) -> dict:
        return self.fn(dict(batch), **self.fn_kwargs)


# -------------------------------------------------------------------------------------------
# builders: a stage spec from the one config schema


def extract_spec(cfg, *, name: str = "extract", layers: list[int] | None = None, align_tolerance: int = 2,
                 adapter: str | None = None, positions: str = "sample", max_position: int | None = None,
                 stride: int = 1) -> StageSpec:
    pool = cfg.pools["extract"]
    kw = dict(base=cfg.base, layers=list(layers or cfg.layers), seed=cfg.seed, positions_per_doc=cfg.positions_per_doc,
              max_length=cfg.max_length, dtype=pool.dtype, align_tolerance=align_tolerance)
    if adapter:  # only when given, so the fingerprints of plain extractions do not change
        kw["adapter"] = str(adapter)
    if positions != "sample":  # likewise: the position rule is recorded only when it is not stage 0
        kw.update(positions=positions, max_position=max_position, stride=int(stride))
    return StageSpec(Extract, name, pool, kw)


def answer_spec(cfg, *, offsets: list[int], max_new_tokens: int = 64, name: str = "answer", pool=None) -> StageSpec:
    """A ChatAnswer pool (the base model generating, on the extraction pool's resources)."""
    pool = pool or cfg.pools["extract"]
    return StageSpec(ChatAnswer, name, pool, dict(base=cfg.base, layers=list(cfg.extract_layers),
                                                  offsets=[int(o) for o in offsets],
                                                  max_new_tokens=int(max_new_tokens), seed=cfg.seed, dtype=pool.dtype))


def av_spec(cfg, av_dir: str, *, name: str = "av", src: str = "", out: str = "", pool=None, **override) -> StageSpec:
    pool, a = pool or cfg.pools["av"], cfg.av
    kw = dict(av_dir=str(av_dir), dtype=pool.dtype, seed=cfg.seed, temperature=a.temperature, n_samples=a.n_samples,
              max_new_tokens=a.max_new_tokens, banned_chars=list(a.banned_chars), backend=a.backend, src=src, out=out,
              decode_batch=a.decode_batch, attn=a.attn, batch_size=pool.batch_size)
    kw.update(override)
    return StageSpec(Verbalize, name, pool, kw)


def ar_spec(cfg, ar_dir: str, *, name: str = "ar", reads: list | None = None, pool=None) -> StageSpec:
    """An AR pool; `reads`: (text column, gold column, position column, suffix) tuples."""
    pool = pool or cfg.pools["ar"]
    return StageSpec(Reconstruct, name, pool, dict(ar_dir=str(ar_dir), dtype=pool.dtype, batch_size=pool.batch_size,
                                                   reads=[list(r) for r in (reads or [("explanation", "vector", "position", "")])]))


def apply_spec(fn: Callable[[dict], dict], *, name: str, num_cpus: float = 1.0, batch_size: int = 64,
               **fn_kwargs) -> StageSpec:
    return StageSpec(Apply, name, PoolConfig(num_cpus=num_cpus, batch_size=batch_size), dict(fn=fn, **fn_kwargs))
