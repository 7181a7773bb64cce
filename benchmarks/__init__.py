"""Speed, memory and map-quality benchmarks; run from the repository root as ``python -m benchmarks.<name>``
(results in docs/)."""
