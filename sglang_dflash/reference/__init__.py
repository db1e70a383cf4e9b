"""Pure-torch oracles: a tiny Kimi-Linear-shaped target, the DFlash loop, offline acceptance."""
