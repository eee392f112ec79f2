"""The synthetic world: factors, scenarios and the pure renderer that turns rows into CT patches."""
