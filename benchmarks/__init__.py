"""Speed, FLOP and memory measurements of MoE-BART against dense BART (`python -m benchmarks`; not tests)."""
