"""Speed levers: each one a module with ``apply(model, cfg, earlier) -> Applied | Declined``,
run in the order of one list (``mmtune.speed.levers.LEVERS``) by loading, tests and benchmarks."""
