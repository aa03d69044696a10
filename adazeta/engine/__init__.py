"""The engine behind every run: build, loop, checkpoint and resume, the replay log, divergence guard, torchrun's process group, memory, metric loggers, SIGINT/SIGTERM, the run folder."""
