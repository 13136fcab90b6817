"""The three commands as plain functions of a composed config: train(cfg), evaluate(cfg), infer(cfg)."""
