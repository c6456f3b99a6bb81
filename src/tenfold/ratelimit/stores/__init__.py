"""Counter store backends: memory (in-process) and Redis (one Lua round trip per check)."""
