"""Metrics that training stages compute themselves (numpy only): the classification scores of the
missing-modality benchmarks and the continual-learning result matrix. Benchmark scoring of
generated answers lives in ``eval_suites/``, which the library never imports."""
