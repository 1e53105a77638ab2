"""Benchmark evaluation (V*, HR-Bench, MME-RealWorld, synthetic) in default / thinking / p2r modes."""
