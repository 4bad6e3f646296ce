"""Started by tests/train/test_context_parallel.py under torchrun (gloo, CPU): context parallelism against one
process, scenario by scenario, in one launch.

Each scenario builds a small hybrid (attention with grouped KV heads, GDN with grouped value heads), computes the
loss and every parameter gradient on the whole batch in this process (what one process computes), then the same
with the model parallelized as the trainer does it (context parallelism over all ranks, FSDP2 over the
``dp_shard x cp`` mesh, the loss normalised over the global token count) on this rank's slice of every row.
Rank 0 prints one JSON line per scenario: the loss, the largest gradient error relative to that parameter's
largest gradient, and the bytes this rank sent per collective. The "batch" scenarios run ``MODEL`` on ``batch``;
the "shapes" ones other head groupings, positions, rows, slice lengths and conv widths (``odd_shapes``,
``three_rows``).
"""

from __future__ import annotations

import copy
import json
import sys
from collections import Counter

import torch

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.distributed import destroy, init_distributed
from olmo_hybrid.model import HybridLM
from olmo_hybrid.train.loss import loss_terms
from olmo_hybrid.train.parallel import parallelize

Z = 1e-2  # a large z-loss weight, so that its gradient is part of the comparison
MODEL = dict(vocab_size=97, d_model=32, n_layers=3, layer_pattern="GAG", n_heads=8, n_kv_heads=4, gdn_heads=4,
             gdn_v_heads=8, gdn_head_k=8, gdn_head_v=8, mlp_hidden=64, rope_theta=10000.0, max_seq_len=512)
# GDN head counts that no degree > 1 divides: state passing has no limit from them.
ODD_GDN_HEADS = dict(gdn_heads=3, gdn_v_heads=6)


def odd_shapes(n: int) -> dict:
    """A hybrid of shapes MODEL does not have, for ``n`` ranks: 3 query heads per KV head and 3 GDN value heads per
    key head (3 query / value heads per rank in Ulysses mode), head dims 4 (attention) and 6 / 4 (GDN), 4 layers."""
    return dict(MODEL, d_model=12 * n, n_layers=4, layer_pattern="GAGA", n_heads=3 * n, n_kv_heads=n, gdn_heads=n,
                gdn_v_heads=3 * n, gdn_head_k=6, gdn_head_v=4, mlp_hidden=40)


YARN = dict(rope_type="yarn", rope_factor=4.0, rope_original_max_seq_len=64)
NOPE = dict(rope_theta=None)


def three_rows(t: int, n: int, seed: int = 1):
    """Three rows of ``t`` tokens over ``n`` slices of T/n: a document starting at every slice border; one document
    crossing every border (from token 3 on); and documents starting just before and just after the first border
    and a one-token document at the end."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MODEL["vocab_size"], (3, t), generator=gen)
    labels = torch.randint(0, MODEL["vocab_size"], (3, t), generator=gen)
    tl = t // n
    starts = [[r * tl for r in range(1, n)], [3], [tl - 1, tl + 1, t - 1]]
    docs = torch.zeros(3, t, dtype=torch.long)
    for row, positions in enumerate(starts):
        for p in positions:
            docs[row, p:] += 1
    return ids, labels, docs


def batch(t: int, n: int, seed: int = 0):
    """Two rows of ``t`` tokens with packed documents whose boundaries fall on and around the slice borders of
    ``n`` ranks (T/n each): at a slice's first token, inside the conv halo before it, on a slice's last token,
    and one document spanning every slice after the first (its state crosses several ranks)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MODEL["vocab_size"], (2, t), generator=gen)
    labels = torch.randint(0, MODEL["vocab_size"], (2, t), generator=gen)
    labels[0, :5] = -100
    tl = t // n
    starts = [[tl - 2, tl], [7, tl + 1, 2 * tl - 1]]
    docs = torch.zeros(2, t, dtype=torch.long)
    for row, positions in enumerate(starts):
        for p in positions:
            docs[row, p:] += 1
    return ids, labels, docs


def loss_and_grads(model, ids, labels, docs, norm):
    ce, z, _ = loss_terms(model(ids, doc_ids=docs), labels)
    loss = (ce + Z * z) / norm
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name.replace("._checkpoint_wrapped_module", "")] = g
    return (ce + Z * z).detach(), grads


def main() -> None:
    env = init_distributed("cpu")
    world = env.world_size
    torch.set_num_threads(1)
    # (mode, intra-document masking, GDN heads, activation checkpointing, CP degree): CP over all ranks, and
    # with 4 ranks also 2 data-parallel x 2 context-parallel (each data-parallel rank one of the 2 rows).
    scenarios = [("ulysses", True, {}, "none", world), ("ulysses", False, {}, "none", world),
                 ("state_passing", True, ODD_GDN_HEADS, "none", world),
                 ("state_passing", False, ODD_GDN_HEADS, "none", world), ("state_passing", True, {}, "none", world),
                 ("state_passing", True, {}, "full", world)]
    if world == 4:
        scenarios += [("ulysses", True, {}, "none", 2), ("state_passing", True, ODD_GDN_HEADS, "none", 2)]
    # (mode, intra-document masking, model, slice length): odd shapes, YaRN and NoPE attention, three rows, short
    # slices with a 2-tap conv (a halo of 1) and a 5-tap one (the halo is the previous rank's whole slice).
    odd = odd_shapes(world)
    shapes = [("ulysses", True, {**odd, **YARN}, 70), ("state_passing", True, {**odd, **NOPE}, 70),
              ("ulysses", False, {**odd, **NOPE}, 70), ("state_passing", False, {**odd, **YARN}, 70),
              ("ulysses", True, {**odd, "gdn_conv_size": 2}, 5), ("state_passing", True, {**odd, "gdn_conv_size": 5}, 4)]
    compile = "--compile" in sys.argv  # every block compiled (fullgraph), collectives included: one scenario
    if compile:
        scenarios, shapes = [("state_passing", True, {}, "none", world)], []
    cases = [(mode, doc_masking, {**MODEL, **heads}, ac, n, 96, "batch") for mode, doc_masking, heads, ac, n in scenarios]
    cases += [(mode, doc_masking, shape, "none", world, tl, "shapes") for mode, doc_masking, shape, tl in shapes]
    for mode, doc_masking, shape, ac, n, tl, kind in cases:
        t = tl * n  # default: slices of 96 tokens, a full and a partial chunk of the GDN op each
        torch.manual_seed(0)
        plain = HybridLM(ModelConfig(**shape))
        model = copy.deepcopy(plain)
        ids, labels, docs = batch(t, n) if kind == "batch" else three_rows(t, n)
        docs = docs if doc_masking else None
        count = (labels != -100).sum().item()
        want_loss, want = loss_and_grads(plain, ids, labels, docs, count)

        plan = parallelize(model, env, ac=ac, cp_degree=n, cp_mode=mode, compile=compile,
                           compile_backend="aot_eager_decomp_partition")
        plan["cp"].sent = Counter()
        dp_rank, cp_rank = divmod(env.rank, n)
        rows, cols = slice(dp_rank, None, world // n), slice(cp_rank * (t // n), (cp_rank + 1) * (t // n))
        local_loss, got = loss_and_grads(model, ids[rows, cols], labels[rows, cols],
                                         None if docs is None else docs[rows, cols], count / world)
        torch.distributed.all_reduce(local_loss)
        errors = {name: ((got[name] - g).abs().max() / g.abs().max()).item() for name, g in want.items()}
        if env.is_main:
            print(json.dumps({"kind": kind, "mode": mode, "doc_masking": doc_masking, "ac": ac,
                              "gdn_heads": plain.config.gdn_heads, "rope": "none" if plain.config.rope_theta is None else
                              plain.config.rope_type, "conv": plain.config.gdn_conv_size, "rows": ids.shape[0],
                              "world": world, "cp": n, "t": t, "compiled": compile, "loss": local_loss.item() / count, "want_loss": want_loss.item() / count,
                              "grad_rel_err": max(errors.values()), "worst": max(errors, key=errors.get),
                              "params": len(errors), "zero_grads": [k for k, g in want.items() if not g.any()],
                              "sent": {f"{label}/{way}": b for (label, way), b in plan["cp"].sent.items()}}),
                  flush=True)
    destroy()


if __name__ == "__main__":
    main()
