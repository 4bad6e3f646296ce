"""Shared pieces of the serve tests: a tiny random model, the full-forward reference, a toy tokenizer, and helpers
to run and watch a server on 127.0.0.1."""

import contextlib
import time

import torch

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.model import HybridLM

VOCAB = 61
MODEL_NAME = "tiny"
PROMPT = "the cat sat"


def tiny_model(pattern="GGGA", seed=0, **kw) -> HybridLM:
    cfg = dict(vocab_size=VOCAB, d_model=48, n_layers=4, n_heads=4, gdn_heads=2, gdn_head_k=12, gdn_head_v=24,
               mamba_head_dim=12, mamba_state_size=16, mamba_n_groups=2, mlp_hidden=96, rope_theta=10_000.0,
               max_seq_len=400, layer_pattern=pattern)
    cfg.update(kw)
    torch.manual_seed(seed)
    return HybridLM(ModelConfig(**cfg)).eval()


@torch.no_grad()
def greedy_by_full_forwards(model: HybridLM, prompt: torch.Tensor, n: int) -> list[int]:
    """The reference: re-run the whole sequence for every new token."""
    ids = prompt[None]
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def save_tiny_checkpoint(path, max_seq_len=128):
    """A HF checkpoint directory of a tiny GGGA model (fp32) with a small BPE tokenizer; logits are peaked, so
    greedy continuations vary rather than repeat one token. Returns (model, tokenizer)."""
    from olmo_hybrid.data.tokenizer import train_bpe

    tok = train_bpe(["the cat sat on the mat, the dog sat on the log"] * 4, vocab_size=270)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=272, d_model=32, n_layers=4, n_heads=2, gdn_heads=2, gdn_head_k=8, gdn_head_v=16,
                      mlp_hidden=64, max_seq_len=max_seq_len, layer_pattern="GGGA")
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)
    tok.save(path)
    return model, tok


def random_prompts(lengths, seed=1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]


class LetterTokenizer:
    """Token i decodes to a letter, doubled when i % 3 == 0, so a stop string can span tokens."""

    eos_token_id = None

    def decode(self, ids):
        return "".join(chr(97 + i % 26) * (2 if i % 3 == 0 else 1) for i in ids)


@contextlib.contextmanager
def running_server(checkpoint, **settings):
    """``(url, server)`` of a server for ``checkpoint`` on a free port of 127.0.0.1, shut down on exit."""
    from olmo_hybrid.checkpoint import load_model_and_tokenizer
    from olmo_hybrid.serve.runner import BackgroundServer
    from olmo_hybrid.serve.server import ServeSettings, build_app

    model, tok = load_model_and_tokenizer(checkpoint)
    options = dict(name=MODEL_NAME, max_batch=4, max_queue=4, prefix_block=8, prefix_cache_bytes=2**20,
                   shutdown_timeout=2.0)
    options.update(settings)
    app = build_app(model, tok, ServeSettings(**options), checkpoint_dir=checkpoint)
    with BackgroundServer(app, shutdown_timeout=options["shutdown_timeout"]) as url:
        yield url, app.state.server


def openai_client(url, **kw):
    """The real openai client, talking only to ``url`` (no proxies from the environment, no retries)."""
    import httpx
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(trust_env=False, timeout=kw.pop("timeout", 60.0)), **kw)


def wait_until(condition, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.01)


@contextlib.contextmanager
def slow_steps(srv, seconds):
    """Every engine step of ``srv`` takes at least ``seconds`` (to catch a request mid-stream)."""
    engine = srv.engine
    step = engine.step

    def slow():
        time.sleep(seconds)
        return step()

    engine.step = slow
    try:
        yield
    finally:
        del engine.step


def idle(srv) -> bool:
    """No request in flight, no slot taken, nothing waiting: the state a server must return to."""
    e = srv.engine
    return (srv.loop.in_flight == 0 and not e.has_work and e.cache.num_free == e.max_batch
            and not srv.loop._handles)


def streamed_text(stream, chat=False):
    """The text of a streamed openai response (all choices' pieces in order), and its chunks."""
    chunks = list(stream)
    pieces = [(c.choices[0].delta.content or "") if chat else c.choices[0].text for c in chunks if c.choices]
    return "".join(pieces), chunks


def error_of(response) -> dict:
    """The OpenAI error object of an httpx response, checked to have exactly OpenAI's fields."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]
