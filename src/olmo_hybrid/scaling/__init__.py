"""Scaling studies: a ladder runner with WSD-S budgets and Chinchilla fits with bootstrap (docs/scaling.md).

Ladder (``ladder.py``, ``jobs.py``, ``runner.py``; imports the trainer)::

    LadderConfig, RecipeConfig, ARCHITECTURES     the config (JSON + dotted overrides, olmo_hybrid.config)
    load_ladder(path, overrides) -> LadderConfig;  plan_ladder(cfg) -> LadderPlan (runs, points, warnings)
    describe(plan, peak_flops, mfu) -> str         steps, epochs, FLOPs and GPU time of every run
    run_ladder(plan, out, parallel=, max_minutes=, archs=, sizes=) -> exit code   (``olmo-hybrid ladder``)
    run_job(plan, run, out, deadline) -> "done" | "paused"                          one run, in this process

Results (``results.py``)::

    append_result(path, record), read_results(path) -> [Point(line, record)], check_point(path, point),
    unique_points(path, points) -> points (repeats once; conflicting repeats and mixed held-out sets: errors)

Fitting (``law.py``, ``fit.py``, ``plots.py``; scipy and matplotlib, the ``scaling`` extra; no torch)::

    Law(E, A, alpha, B, beta).loss(N, D) / .tokens_for(L, N);  fit_law(N, D, L) -> FitResult
    design_problem(N, D) -> why these points cannot determine the law (too few sizes or points, one budget) | None
    analyse(results_path, FitOptions(reference=, target_loss=, sizes=, bootstrap=)) -> Analysis
        .fit_json (the fit.json schema), .details (method, rollout check, skipped architectures)
    plot_loss_vs_tokens(analysis, path), plot_token_savings(analysis, path)

Nothing is imported here: ``olmo-hybrid scaling fit`` must not pay for torch.
"""
