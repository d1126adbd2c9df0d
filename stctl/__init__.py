"""The operator's side of SmallThinker Fleet: build, sign, publish, roll out, watch."""
