"""`olmo-hybrid eval` on a randomly initialised dolma2-vocabulary hybrid: checks every suite runs on a GPU at
RULER lengths up to 8k and reports how long each takes (scores of an untrained model are ~0 by design).

    python benchmarks/eval_smoke_gpu.py OUT_DIR [--device cuda]
"""

import argparse
import sys
import tempfile

from olmo_hybrid.cli import main as cli_main
from olmo_hybrid.config import ModelConfig
from olmo_hybrid.data.tokenizer import load_tokenizer
from olmo_hybrid.model import HybridLM

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--device", default="cuda")
args = p.parse_args()
ckpt = tempfile.mkdtemp()
cfg = ModelConfig(vocab_size=100352, d_model=256, n_layers=4, layer_pattern="GGGA", n_heads=4, gdn_heads=4,
                  gdn_head_k=64, gdn_head_v=128, mlp_hidden=768, max_seq_len=8192)
HybridLM(cfg).save_pretrained(ckpt, tokenizer=load_tokenizer("dolma2"))
sys.exit(cli_main(["eval", ckpt, "--device", args.device, "--out", args.out, "--suite", "ruler,bpb,probes",
                   "--batch-size", "4", "--lengths", "2048,8192", "--samples", "4",
                   "--ruler-tasks", "niah_single_1,niah_multikey_3,niah_multiquery,vt,cwe,fwe",
                   "--max-docs", "1", "--probe-tasks", "parity", "--probe-steps", "50", "--no-plot"]))
