"""Redis: fast, atomic counters. Every key format lives in keys.py and every
Lua script in lua.py."""
