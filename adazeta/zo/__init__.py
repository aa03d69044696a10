"""The zeroth-order parts: the noise stream, SPSA, estimators, update rules, query schedules, Sparse-MeZO, and the estimators since MeZO."""
