"""The zeroth-order parts: the noise stream, SPSA, estimators, parallel queries, Sparse-MeZO, update rules, query schedules, and the estimators since MeZO (FZOO, LOZO, HiZOO)."""
