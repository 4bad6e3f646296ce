"""An lm-evaluation-harness model class for olmo-hybrid checkpoints (optional extra: ``pip install lm-eval``).

    import lm_eval
    from olmo_hybrid.eval.lm_eval_adapter import OlmoHybridLM
    lm = OlmoHybridLM.from_checkpoint("path/to/hf_dir_or_run_dir")
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=lm_eval.tasks.TaskManager(include_path=...))

or from the harness command line, after importing this module once (it registers the name):
``lm_eval --model olmo-hybrid --model_args pretrained=DIR,batch_size=8``.

All scoring goes through ``EvalRunner`` (the same code as ``olmo-hybrid eval``), so the harness and our
own multiple-choice scorer agree by construction; a test runs both on the same local task.

Conventions are lm-eval's ``HFLM`` (tests compare the two on the same weights through transformers):
text is encoded as transformers' ``tokenizer(text)`` encodes it (a BOS first when the tokenizer adds one),
context/continuation split by ``TemplateLM`` (trailing context spaces move to the continuation, so the
continuation never holds the BOS; an empty context conditions on ``prefix_token_id``: the tokenizer's named
BOS, else the end-of-document id, and its continuation is encoded without a BOS), inputs longer than
``max_length`` lose tokens on the left, rolling log-likelihoods use lm-eval's disjoint windows, and ``generate_until`` reads its arguments with
lm-eval's own ``normalize_gen_kwargs`` (``max_gen_toks`` and its aliases, default 256; ``until`` plus the
end-of-document text), keeps the last ``max_length - max_gen_toks`` prompt tokens, decodes greedily, drops
special tokens from the text and cuts it at the first stop string. Sampling is refused.
"""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from olmo_hybrid.eval.runner import EvalRunner, prefix_token_id


@register_model("olmo-hybrid")
class OlmoHybridLM(TemplateLM):
    def __init__(self, model=None, tokenizer=None, pretrained: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, device: str = "cpu", max_gen_toks: int = 256, **kwargs):
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"OlmoHybridLM: batch_size must be a positive integer, got {batch_size!r}")
        if model is None:
            if pretrained is None:
                raise ValueError("OlmoHybridLM needs model=/tokenizer= objects or pretrained=<checkpoint dir>")
            from olmo_hybrid.checkpoint import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(pretrained, device=device)
        if tokenizer is None:
            raise ValueError("OlmoHybridLM needs the checkpoint's tokenizer")
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError("OlmoHybridLM: the tokenizer has no end-of-document id to condition on")
        self.model, self.tokenizer_, self.max_gen_toks = model.eval(), tokenizer, int(max_gen_toks)
        length = int(max_length or model.config.max_seq_len)
        self.runner = EvalRunner(model, batch_size=int(batch_size), max_length=length,
                                  prefix_id=prefix_token_id(tokenizer), progress=False)

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs) -> OlmoHybridLM:
        return cls(pretrained=path, **kwargs)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.runner.prefix_id

    @property
    def max_length(self) -> int:
        return self.runner.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string, add_special_tokens=add_special_tokens is not False)

    def tok_decode(self, tokens, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer_.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self.runner.loglikelihood([(ctx, cont) for _, ctx, cont in requests], desc="lm-eval loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # lm-eval's definition: disjoint windows of max_length tokens, the first conditioned on EOT.
        return [-self.runner.rolling_nll(self.tok_encode(req.args[0])) for req in requests]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        prompts, stops, by_budget = [], [], {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            if kwargs["do_sample"]:
                raise ValueError("OlmoHybridLM.generate_until supports greedy decoding only (do_sample=False, "
                                 f"temperature=0); request {i} asks to sample")
            max_new = kwargs["max_gen_toks"]
            if not 0 < max_new < self.max_length:
                raise ValueError(f"max_gen_toks={max_new} must be in [1, max_length={self.max_length}) to leave "
                                 "room for a prompt")
            prompts.append(self.tok_encode(context)[-(self.max_length - max_new):] or [self.eot_token_id])
            stops.append(handle_stop_sequences(kwargs["until"], eos=eos))
            by_budget.setdefault(max_new, []).append(i)
        out: list[str | None] = [None] * len(requests)
        for max_new, idx in by_budget.items():
            new = self.runner.generate_greedy([prompts[i] for i in idx], max_new, eos_token_id=self.eot_token_id,
                                              desc="lm-eval generate_until")
            for i, toks in zip(idx, new):
                out[i] = postprocess_generated_text(self.tok_decode(toks), stops[i], None)
        return out
