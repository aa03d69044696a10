"""The memory planner behind `adazeta-plan`: the peak memory of a training run, predicted before the
weights are downloaded. arch.py reads the architecture and builds the longest batch; measure.py
measures one depth in a fresh process; line.py fits peak = a + b x layers and reads it at full
depth. How and why: docs/design.md, section "The memory planner"."""
