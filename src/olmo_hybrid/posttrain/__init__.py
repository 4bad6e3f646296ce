"""Post-training: supervised fine-tuning and DPO on the project's trainer (docs/posttrain.md).

Chat templates (choosing, checking and rendering conversations) live in ``olmo_hybrid.data.chat``, shared
with ``generate --chat`` and the server; this package adds what training on them needs.

Public API::

    examples.read_records(path_or_dataset, split), tokenize_conversations(...), tokenize_pairs(...),
             encode_with_mask(chat, messages, first=0) (token ids + which are assistant tokens)
    packing.pack_conversations(...), build_rows(...), RowLoader(rows, batch_size, seed, rank, world_size)
    losses.sequence_logps(logits, labels, doc_ids), response_logps(sums, counts, loss), dpo_loss(...)
    config.SFTConfig, DPOConfig, build_posttrain_config(kind, config_file, overrides)
    source.prepare_source(path, template) -> Source (weights, config, tokenizer with the run's template)
    trainer.run_sft(cfg, source, run_dir, resume=False, overwrite=False), SFTTrainer, start(kind, ...);
    dpo.run_dpo(...), DPOTrainer
    evaluate.greedy_replies(model, chat, questions), exact_match(...), preference_margin(...)

Command line: ``olmo-hybrid sft SOURCE DATA.jsonl``, ``olmo-hybrid dpo SOURCE PAIRS.jsonl``,
``olmo-hybrid generate CKPT --chat --prompt TEXT``.
"""
