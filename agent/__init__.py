"""The device's side of SmallThinker Fleet: verified downloads into a content-addressed store,
then (agent issue) activation, health checks, telemetry and the device API."""
