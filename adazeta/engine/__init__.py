"""The engine behind every run: build, loop, checkpoint and resume, guard, distributed, memory, logging."""
