"""An lm-evaluation-harness model class for olmo-hybrid checkpoints (optional extra: ``pip install lm-eval``).

    import lm_eval
    from olmo_hybrid.eval.lm_eval_adapter import OlmoHybridLM
    lm = OlmoHybridLM.from_checkpoint("path/to/hf_dir_or_run_dir")
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=lm_eval.tasks.TaskManager(include_path=...))

or from the harness command line, after importing this module once (it registers the name):
``lm_eval --model olmo-hybrid --model_args pretrained=DIR,batch_size=8``.

All scoring goes through ``EvalRunner`` (the same code as ``olmo-hybrid eval``), so the harness and our
own multiple-choice scorer agree by construction; a test runs both on the same local task.
"""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from olmo_hybrid.eval.haystack import encode_ids
from olmo_hybrid.eval.runner import EvalRunner


@register_model("olmo-hybrid")
class OlmoHybridLM(TemplateLM):
    def __init__(self, model=None, tokenizer=None, pretrained: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, device: str = "cpu", **kwargs):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("OlmoHybridLM needs model=/tokenizer= objects or pretrained=<checkpoint dir>")
            from olmo_hybrid.checkpoint import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(pretrained, device=device)
        if tokenizer is None:
            raise ValueError("OlmoHybridLM needs the checkpoint's tokenizer")
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError("OlmoHybridLM: the tokenizer has no end-of-document id to condition on")
        self.model, self.tokenizer_ = model.eval(), tokenizer
        length = int(max_length or model.config.max_seq_len)
        self.runner = EvalRunner(model, batch_size=int(batch_size), max_length=length,
                                  prefix_id=tokenizer.eos_token_id, progress=False)

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs) -> OlmoHybridLM:
        return cls(pretrained=path, **kwargs)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_token_id

    @property
    def max_length(self) -> int:
        return self.runner.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return encode_ids(self.tokenizer_, string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer_.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self.runner.loglikelihood([(ctx, cont) for _, ctx, cont in requests], desc="lm-eval loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # lm-eval's definition: disjoint windows of max_length tokens, the first conditioned on EOT.
        return [-self.runner.rolling_nll(self.tok_encode(req.args[0])) for req in requests]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("OlmoHybridLM.generate_until supports greedy decoding only (do_sample=False)")
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.eot_token_id]
            new = self.runner.generate_greedy([ids], max_new, eos_token_id=self.eot_token_id)[0]
            text = self.tok_decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out
