"""The engine behind every run: build, loop, checkpoint and resume, divergence guard, distributed, memory, metric loggers, SIGINT/SIGTERM, the run folder."""
