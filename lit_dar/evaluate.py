"""lm-eval-harness on in-memory LitGPT models.

`LitGPTLM` wraps any ``litgpt.GPT`` (a DAR-patched model included: it keeps GPT's forward and
KV-cache API) and a ``litgpt.Tokenizer``, so a model can be evaluated straight from a training
run or a converted checkpoint without going through Hugging Face. `run_lm_eval` runs tasks,
including local task YAMLs through ``include_path`` so evaluation can work fully offline.

lm-eval is an optional dependency: this module imports without it and only needs it when
`LitGPTLM` or `run_lm_eval` is used (``pip install 'lit-dar[eval]'``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from litgpt import GPT
    from litgpt.tokenizer import Tokenizer
    from lm_eval.api.instance import Instance


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "Evaluation needs lm-eval-harness, which is not installed: pip install 'lit-dar[eval]'"
        ) from e


class _LitGPTLMMethods:
    """The body of `LitGPTLM`; kept free of lm-eval so this module imports without it."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()
        if tokenizer.eos_id is None and tokenizer.bos_id is None:
            raise ValueError("The tokenizer defines neither eos nor bos; lm-eval needs one to condition on empty contexts.")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self._max_length = max_length
        self.max_gen_toks = int(max_gen_toks)
        if tokenizer.backend == "huggingface":
            known = tokenizer.processor.get_vocab_size(with_added_tokens=True)
        else:
            known = tokenizer.processor.vocab_size()
        # Greedy decoding only picks ids the tokenizer can decode, never the padding rows of lm_head.
        self.vocab_limit = min(known, model.config.padded_vocab_size)

    # --- properties lm-eval reads -------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.tokenizer.bos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and each rolling window) is conditioned on: bos, else eos."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length or self.model.max_seq_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.model_name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """``add_special_tokens=None`` follows the tokenizer's own bos setting (``use_bos``)."""
        return self.tokenizer.encode(string, bos=add_special_tokens).tolist()

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(torch.tensor(list(tokens), dtype=torch.long))

    # --- scoring -----------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Score ``(key, context_ids, continuation_ids)`` requests in right-padded batches.

        Longest first so a batch's padding is small; a causal model's logits at real positions
        do not depend on padding to their right. Inputs longer than ``max_length`` lose tokens
        on the left, as in lm-eval's HF model.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        with _eval_mode(self.model):
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                rows = []
                for i in chunk:
                    _, context, continuation = requests[i]
                    if not 0 < len(continuation) <= self.max_length:
                        raise ValueError(f"Continuation of {len(continuation)} tokens; need 1..{self.max_length}.")
                    rows.append((context + continuation)[-(self.max_length + 1) :][:-1])
                width = max(map(len, rows))
                batch = torch.zeros(len(rows), width, dtype=torch.long)
                for r, row in enumerate(rows):
                    batch[r, : len(row)] = torch.tensor(row)
                logprobs = torch.log_softmax(self.model(batch.to(self.device)).float(), dim=-1)
                for r, i in enumerate(chunk):
                    key, _, continuation = requests[i]
                    target = torch.tensor(continuation, device=logprobs.device)
                    scores = logprobs[r, len(rows[r]) - len(continuation) : len(rows[r])]
                    logprob = scores.gather(-1, target[:, None]).double().sum().item()  # fp64: batch-independent
                    greedy = bool((scores.argmax(dim=-1) == target).all())
                    results[i] = (logprob, greedy)
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, (logprob, greedy))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint ``max_length`` windows (lm-eval's own windowing)."""
        from lm_eval import utils

        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for n, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for context, target in map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1),
            ):
                windows.append((None, context, target))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation --------------------------------------------------------------------
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding with the KV cache until a stop string, eos, or ``max_gen_toks``.

        Requests whose prompts have the same token length and budget share a batch (LitGPT's KV
        cache takes one position per step for the whole batch, so prompts are not padded).
        Prompts are cut on the left to leave room for ``max_gen_toks`` within ``max_length``.
        """
        jobs = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs or {})
            if kwargs.get("do_sample") and kwargs.get("temperature", 1.0) != 0:
                raise ValueError(
                    "LitGPTLM decodes greedily only, but the task asks for sampling;"
                    " pass gen_kwargs='do_sample=False' to run it greedily."
                )
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
            jobs.append((prompt, max_new, [s for s in until if s]))

        results: list[str | None] = [None] * len(jobs)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (prompt, max_new, _) in enumerate(jobs):
            groups.setdefault((len(prompt), max_new), []).append(i)
        for (prompt_len, max_new), members in sorted(groups.items()):
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                prompts = torch.tensor([jobs[i][0] for i in chunk], dtype=torch.long)
                steps = min(max_new, self.max_length - prompt_len)
                texts = self._greedy(prompts, steps, [jobs[i][2] for i in chunk])
                for i, text in zip(chunk, texts, strict=True):
                    results[i] = text
        for req, text in zip(requests, results, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _greedy(self, prompts: torch.Tensor, steps: int, stops: list[list[str]]) -> list[str]:
        batch_size, prompt_len = prompts.shape
        generated: list[list[int]] = [[] for _ in range(batch_size)]
        texts: list[str | None] = [None] * batch_size
        done = [False] * batch_size
        if steps <= 0:
            return [""] * batch_size
        model, device = self.model, self.device
        dtype = next(model.parameters()).dtype
        with _eval_mode(model):
            model.set_kv_cache(batch_size, max_seq_length=prompt_len + steps, device=device, dtype=dtype)
            try:
                pos = torch.arange(prompt_len, device=device)
                logits = model(prompts.to(device), input_pos=pos, input_pos_maxp1=prompt_len)[:, -1]
                for step in range(steps):
                    tokens = logits[:, : self.vocab_limit].argmax(dim=-1)
                    for r, token in enumerate(tokens.tolist()):
                        if done[r]:
                            continue
                        if token == self.tokenizer.eos_id:
                            done[r] = True
                            continue
                        generated[r].append(token)
                        if stops[r]:
                            text, hit = _cut_at_stop(self.tok_decode(generated[r]), stops[r])
                            if hit:
                                texts[r], done[r] = text, True
                    if all(done) or step == steps - 1:
                        break
                    pos = torch.tensor([prompt_len + step], device=device)
                    logits = model(tokens[:, None], input_pos=pos, input_pos_maxp1=prompt_len + step + 1)[:, -1]
            finally:
                model.clear_kv_cache()
        return [self.tok_decode(g) if t is None else t for g, t in zip(generated, texts, strict=True)]


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; report whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate in eval mode and restore the caller's mode (evaluation may run mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _preserved_rng() -> Iterator[None]:
    """lm-eval reseeds python, numpy and torch; keep a surrounding training run's streams intact."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _make_lm_class() -> type:
    _require_lm_eval()
    from lm_eval.api.model import TemplateLM

    return type(
        "LitGPTLM",
        (_LitGPTLMMethods, TemplateLM),
        {
            "__module__": __name__,
            "__qualname__": "LitGPTLM",
            "__doc__": (
                "lm-eval model (``lm_eval.api.model.TemplateLM``, hence ``LM``) around a ``litgpt.GPT`` and its"
                " ``litgpt.Tokenizer``: ``LitGPTLM(model, tokenizer, batch_size=8, max_length=None,"
                " max_gen_toks=256)``. ``max_length`` defaults to ``model.max_seq_length``."
            ),
        },
    )


if TYPE_CHECKING:
    from lm_eval.api.model import TemplateLM

    class LitGPTLM(_LitGPTLMMethods, TemplateLM): ...


def _lm_class() -> type:
    if "LitGPTLM" not in globals():
        globals()["LitGPTLM"] = _make_lm_class()
    return globals()["LitGPTLM"]


def __getattr__(name: str) -> Any:
    # `LitGPTLM` subclasses an lm-eval class, so it is built on first access (PEP 562).
    if name == "LitGPTLM":
        return _lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_lm_eval(
    model: GPT,
    tokenizer: Tokenizer,
    tasks: str | Sequence[str],
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_gen_toks: int = 256,
    bootstrap_iters: int = 100_000,
    log_samples: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate ``model`` on lm-eval ``tasks`` and return lm-eval's results dict.

    Metrics are under ``results["results"][task]``, keyed ``"<metric>,<filter>"`` (e.g.
    ``"acc,none"``). ``include_path`` adds dirs of task YAMLs (local tasks with local data
    files run offline); ``include_defaults=False`` skips indexing lm-eval's built-in tasks,
    which is faster when only local tasks are used. Further ``kwargs`` go to
    ``lm_eval.simple_evaluate``. The model's train/eval mode and the global RNG states are
    restored afterwards, so this is safe to call in the middle of training.
    """
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if isinstance(include_path, (list, tuple)):
        include_path = [str(p) for p in include_path]
    elif include_path is not None:
        include_path = str(include_path)
    task_manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    lm = _lm_class()(model, tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks)
    with _preserved_rng(), _eval_mode(model):
        results = simple_evaluate(
            model=lm,
            tasks=[tasks] if isinstance(tasks, str) else list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            task_manager=task_manager,
            **kwargs,
        )
    if results is None:  # only on non-zero ranks of a distributed lm-eval run
        return {}
    return results
