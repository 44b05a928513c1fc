"""The fleet simulator: the live gateway policy code under a virtual clock (docs/simulator.md)."""
