"""The command-line tools: adazeta-train, -replay, -compare, -plan, -study, -bench."""
