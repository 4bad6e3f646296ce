"""The model-facing half of every evaluation: batched log-likelihoods, greedy generation, rolling NLL.

All suites (RULER, multiple choice, bits per byte, the lm-eval adapter) go through ``EvalRunner`` so
the indexing (logits at position i score token i+1) lives in one place and is tested once.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class Progress:
    """A one-line progress report on stderr: done/total, items/s and ETA; silent when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool = True, every_s: float = 2.0):
        self.total, self.desc, self.enabled, self.every_s = total, desc, enabled, every_s
        self.done, self.start, self.last = 0, time.time(), 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if self.enabled and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            end = "\n" if self.done >= self.total else ""
            print(f"\r{self.desc}: {self.done}/{self.total} ({rate:.1f}/s, ETA {eta:.0f}s)   ",
                  end=end, file=sys.stderr, flush=True)


def prefix_token_id(tokenizer) -> int | None:
    """The id an empty context is conditioned on, as lm-eval's ``HFLM.prefix_token_id`` picks it for the saved
    tokenizer: transformers' ``bos_token_id`` (the named ``bos_token``) when there is one, else the eos id."""
    bos = tokenizer.special_tokens_map.get("bos_token")
    bos_id = tokenizer.backend.token_to_id(bos) if bos is not None else None
    return tokenizer.eos_token_id if bos_id is None else bos_id


@dataclass
class EvalRunner:
    """Wraps a causal LM (``model(ids) -> logits [B,T,V]``) with a token budget per forward batch.

    ``max_length``: longest window scored at once (contexts are truncated from the left beyond it).
    ``prefix_id``: the id conditioned on when a context is empty (``prefix_token_id(tokenizer)``, as lm-eval).
    """

    model: torch.nn.Module
    batch_size: int = 8
    max_length: int = 2048
    prefix_id: int | None = None
    progress: bool = True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- log-likelihoods ---------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, requests: list[tuple[list[int], list[int]]], desc: str = "loglikelihood"):
        """For each (context_ids, continuation_ids): (sum of log p(continuation), continuation is greedy)."""
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"loglikelihood request {i}: continuation has no tokens")
            if len(cont) > self.max_length:
                raise ValueError(f"loglikelihood request {i}: continuation of {len(cont)} tokens exceeds "
                                 f"max_length={self.max_length}")
            if not ctx and self.prefix_id is None:
                raise ValueError(f"loglikelihood request {i}: empty context and no prefix_id to condition on")
        # lm-eval's order (longest first, ties by the tokens themselves): which requests share a batch, and so the
        # padded width and the rows' float rounding, depends only on the set of requests, never on their order.
        order = sorted(range(len(requests)), key=lambda i: (-(len(requests[i][0]) + len(requests[i][1])),
                                                            tuple(requests[i][0]) + tuple(requests[i][1]),
                                                            len(requests[i][0])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = Progress(len(requests), desc, self.progress)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            rows, spans = [], []
            for i in idx:
                ctx, cont = requests[i]
                ctx = list(ctx) if ctx else [self.prefix_id]
                full = (ctx + list(cont))[-(self.max_length + 1):]
                inp = full[:-1]  # the last token is only a target
                rows.append(inp)
                spans.append((len(inp) - len(cont), list(cont)))
            for i, (total, greedy) in zip(idx, self._score_rows(rows, spans)):
                results[i] = (total, greedy)
            bar.update(len(idx))
        return results

    def _score_rows(self, rows: list[list[int]], spans: list[tuple[int, list[int]]]):
        """Right-padded batch (causal, so padding never affects real positions). Only the logits from the
        earliest continuation start onwards are computed, so memory is [B, continuation, vocab], not
        [B, T, vocab]."""
        width = max(len(r) for r in rows)
        pad = rows[0][0]
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=self.device)
        keep = width - min(begin for begin, _ in spans)
        logits = self.model(ids, logits_to_keep=keep) if keep < width else self.model(ids)
        offset = width - logits.shape[1]
        for row, (begin, cont) in enumerate(spans):
            lp = F.log_softmax(logits[row, begin - offset:begin - offset + len(cont)].float(), dim=-1)
            target = torch.tensor(cont, device=lp.device)
            yield lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())

    @torch.no_grad()
    def rolling_nll(self, token_ids: list[int], stride: int | None = None, desc: str | None = None,
                    start: int = 0) -> float:
        """Total NLL (nats) of a document, every token from ``start`` on predicted exactly once.

        Windows of ``stride`` predicted tokens, each conditioned on as many earlier tokens as fit in
        ``max_length``; the first token is conditioned on ``prefix_id`` (``start=0``) or on the tokens before
        ``start`` (a BOS, say). ``stride = max_length`` (the default) is lm-eval's disjoint rolling windows; a
        smaller stride gives every token more context.
        """
        if not 0 <= start <= len(token_ids):
            raise ValueError(f"rolling_nll: start={start} is outside the document's {len(token_ids)} tokens")
        if self.prefix_id is None and start == 0:
            raise ValueError("rolling_nll needs prefix_id (the end-of-document id) to predict the first token")
        stride = stride or self.max_length
        if not 0 < stride <= self.max_length:
            raise ValueError(f"rolling_nll: stride must be in [1, max_length={self.max_length}], got {stride}")
        requests, pos = [], start
        while pos < len(token_ids):
            end = min(len(token_ids), pos + stride)
            ctx = token_ids[max(0, end - self.max_length - 1):pos]
            requests.append((ctx, token_ids[pos:end]))
            pos = end
        return -sum(ll for ll, _ in self.loglikelihood(requests, desc or "rolling"))

    # -- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_greedy(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None = None,
                        desc: str = "generate") -> list[list[int]]:
        """Greedy continuations (new tokens only, cut at EOS), left-padded batches of similar length."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[list[int] | None] = [None] * len(prompts)
        bar = Progress(len(prompts), desc, self.progress)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                p = prompts[i]
                if not p:
                    raise ValueError(f"generation prompt {i} is empty")
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            kwargs = {"eos_token_id": eos_token_id}
            if not bool(mask.all()):
                kwargs["attention_mask"] = mask.to(self.device)
            new = self.model.generate(ids.to(self.device), max_new_tokens, **kwargs)[:, width:].tolist()
            for row, i in enumerate(idx):
                toks = new[row]
                if eos_token_id is not None and eos_token_id in toks:
                    toks = toks[:toks.index(eos_token_id)]
                out[i] = toks
            bar.update(len(idx))
        return out

